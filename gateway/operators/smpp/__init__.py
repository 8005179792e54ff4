"""The SMPP 3.4 connector: `connector` (the Operator), `session` (one bind), `pdus` (parts,
coding, receipts), `errors` (answers -> ptt)."""
