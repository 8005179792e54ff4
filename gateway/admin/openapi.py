"""The OpenAPI 3 document of the admin API, served at `/1.0/openapi.json`.

Written as Python rather than a JSON file so that the parts every operation repeats (error
answers, path parameters) are written once. `tests/test_openapi.py` checks it against the
routes the app registers and fuzzes the app from it, so the two cannot drift apart.
"""

from __future__ import annotations

import copy
from typing import Any

ACCOUNT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LOGIN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
PASSWORD = r"^[A-Za-z0-9]{8,128}$"

_CREDITS = {"type": "number", "description": "Credits, with at most 2 decimals."}
_AMOUNT = {"type": "number", "minimum": 0, "description": "Credits, at most 2 decimals."}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str,
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": {"application/json": {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


_ERRORS = {
    "400": "Invalid input; `field` names the offending field or parameter.",
    "401": "Missing or wrong admin token.",
    "403": "The token is limited to some accounts; this route needs one for all accounts.",
    "404": "Unknown account, user, sender or message, or an account the token does not "
           "cover (or the admin API is disabled).",
    "409": "Conflict with the current state (duplicate, not enough credits).",
    "413": "The body is larger than server.max_request_bytes.",
    "429": "Too many wrong admin tokens from this address (security.max_failures): "
           "refused without checking the token; retry after `Retry-After` seconds.",
    "503": "The store cannot be used right now; retry after `Retry-After` seconds.",
}


def _errors(*codes: str) -> dict[str, Any]:
    # Every admin route can meet these, whatever its input (unknown query parameters: 400).
    base = ("400", "401", "404", "429", "503")
    return {code: _json(_ref("Error"), _ERRORS[code]) for code in sorted({*base, *codes})}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _path(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", **schema}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}


_ACCOUNT = _path("account", "SMS account name, e.g. sms-ab12345-1.", minLength=1)
_LOGIN = _path("login", "API user login.", minLength=1)
_SENDER = _path("sender", "A declared sender.", minLength=1)
_LIMIT = _query("limit", "Page size (default 100).",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100})
_PAGE_HEADERS = {
    "X-Next-Cursor": {"description": "Present when there is a next page: the value to pass "
                                     "as the cursor parameter (`before` or `after`).",
                      "schema": {"type": "string"}},
    "Link": {"description": 'The next page\'s URL, as `<url>; rel="next"` (RFC 8288).',
             "schema": {"type": "string"}},
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["message"],
        "properties": {"message": {"type": "string"},
                       "field": {"type": "string",
                                 "description": "The field or parameter at fault (400)."}},
    },
    "PttDetails": {
        "type": "object", "required": ["description", "comment", "duration"],
        "additionalProperties": False,
        "properties": {
            "description": {"type": "string"},
            "comment": {"type": "string"},
            "duration": {"type": "string",
                         "enum": ["permanent", "temporary", "indeterminated"]},
        },
    },
    "Account": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "creditsLeft", "creditsHoldByQuota", "userQuantityWithQuota",
                     "callBack", "stopClause", "senders"],
        "properties": {
            "name": {"type": "string"},
            "creditsLeft": {**_CREDITS, "description": "The account's balance."},
            "creditsHoldByQuota": {**_CREDITS, "description": "Credits moved to users' "
                                                              "active quotas."},
            "userQuantityWithQuota": {"type": "integer", "minimum": 0},
            "callBack": {"type": "string", "description": "Delivery-report URL, or empty."},
            "stopClause": {"type": "string",
                           "description": "Appended to messages sent without noStop=1."},
            "senders": {"type": "array", "items": {"type": "string"}},
        },
    },
    "AccountCreation": {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "pattern": ACCOUNT_NAME},
                       "credits": {**_AMOUNT, "default": 0}},
    },
    "AccountUpdate": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "callBack": {"type": "string", "nullable": True, "maxLength": 2048,
                         "description": "http(s) URL; empty or null removes it."},
            "stopClause": {"type": "string", "nullable": True, "maxLength": 40,
                           "description": "One line; null restores the server default."},
            "retentionDays": {"type": "integer", "nullable": True, "minimum": 0,
                              "maximum": 36600, "description": "Days the account's messages "
                              "are kept (0: forever); null: the server's retention."},
            "personalDataDays": {"type": "integer", "nullable": True, "minimum": 0,
                                 "maximum": 36600, "description": "Days their texts and "
                                 "numbers are kept; null: the server's retention."},
        },
    },
    "CreditPurchase": {
        "type": "object", "required": ["amount"], "additionalProperties": False,
        "properties": {"amount": {**_AMOUNT, "exclusiveMinimum": True}},
    },
    "Sender": {
        "type": "object", "required": ["sender"], "additionalProperties": False,
        "properties": {"sender": {"type": "string", "description": "Up to 11 letters and "
                                  "digits, or a number of up to 15 digits."}},
    },
    "UserCreation": {
        "type": "object", "required": ["login", "password"], "additionalProperties": False,
        "properties": {"login": {"type": "string", "pattern": LOGIN},
                       "password": {"type": "string", "pattern": PASSWORD,
                                    "writeOnly": True}},
    },
    "QuotaInformations": {
        "type": "object", "additionalProperties": False,
        "required": ["quotaStatus", "quotaLeft"],
        "properties": {"quotaStatus": {"type": "string", "enum": ["active", "inactive"]},
                       "quotaLeft": _CREDITS},
    },
    "AlertThresholdInformations": {
        "type": "object", "additionalProperties": False,
        "required": ["alertThreshold", "support", "alertEmail", "alertNumber"],
        "properties": {
            "alertThreshold": {**_CREDITS, "nullable": True,
                               "description": "null: no low-credit alert."},
            "support": {"type": "string", "enum": ["mail", "sms", "both"]},
            "alertEmail": {"type": "string"},
            "alertNumber": {"type": "string", "description": "International format."},
        },
    },
    "User": {
        "type": "object", "additionalProperties": False,
        "required": ["login", "quotaInformations", "alertThresholdInformations",
                     "ipRestrictions", "callBack"],
        "properties": {
            "login": {"type": "string"},
            "quotaInformations": _ref("QuotaInformations"),
            "alertThresholdInformations": _ref("AlertThresholdInformations"),
            "ipRestrictions": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "callBack": {"type": "string"},
        },
    },
    "UserUpdate": {
        "type": "object", "additionalProperties": False,
        "description": "Any subset of sms.User, plus password. Validated as a whole: if any "
                       "field is invalid, nothing changes. quotaStatus inactive returns the "
                       "quota to the account; quotaLeft sets (and activates) the quota.",
        "properties": {
            "login": {"type": "string", "description": "Must equal the path's login."},
            "password": {"type": "string", "pattern": PASSWORD, "writeOnly": True},
            "quotaInformations": {
                "type": "object", "additionalProperties": False,
                "properties": {"quotaStatus": {"type": "string",
                                               "enum": ["active", "inactive"]},
                               "quotaLeft": _AMOUNT},
            },
            "alertThresholdInformations": {
                "type": "object", "additionalProperties": False,
                "properties": {
                    "alertThreshold": {**_AMOUNT, "nullable": True},
                    "support": {"type": "string", "enum": ["mail", "sms", "both"]},
                    "alertEmail": {"type": "string", "nullable": True, "maxLength": 254},
                    "alertNumber": {"type": "string", "nullable": True},
                },
            },
            "ipRestrictions": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "callBack": {"type": "string", "nullable": True, "maxLength": 2048},
        },
    },
    "HistoryEntry": {
        "type": "object", "additionalProperties": False,
        "required": ["date", "ptt", "dlr", "description"],
        "properties": {
            "date": {"type": "string", "format": "date-time"},
            "ptt": {"type": "integer", "nullable": True},
            "dlr": {"type": "integer"},
            "description": {"type": "string"},
        },
    },
    "Outgoing": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "creationDatetime", "credits", "deliveredAt", "deliveryReceipt",
                     "message", "messageLength", "numberOfSms", "ptt", "receiver", "sender",
                     "tag", "sentAt", "history"],
        "properties": {
            "id": {"type": "integer"},
            "creationDatetime": {"type": "string", "format": "date-time"},
            "credits": _CREDITS,
            "deliveredAt": {"type": "string", "format": "date-time", "nullable": True},
            "deliveryReceipt": {"type": "integer",
                                "description": "DLR status id: 0 pending, 1 success, "
                                               "2 failed, 4 waiting, 8 buffered, "
                                               "16 error/not billed."},
            "message": {"type": "string"},
            "messageLength": {"type": "integer", "minimum": 0},
            "numberOfSms": {"type": "integer", "minimum": 0},
            "ptt": {"type": "integer", "nullable": True},
            "receiver": {"type": "string"},
            "sender": {"type": "string"},
            "tag": {"type": "string"},
            "sentAt": {"type": "string", "format": "date-time", "nullable": True},
            "history": {"type": "array", "items": _ref("HistoryEntry")},
        },
    },
    "Incoming": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "creationDatetime", "sender", "message", "tag"],
        "properties": {
            "id": {"type": "integer"},
            "creationDatetime": {"type": "string", "format": "date-time"},
            "sender": {"type": "string", "description": "The handset's number."},
            "message": {"type": "string"},
            "tag": {"type": "string",
                    "description": "The tag of the message it answers, if any."},
        },
    },
    "LedgerEntry": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "date", "kind", "login", "from", "to", "amount", "reference"],
        "properties": {
            "id": {"type": "integer"},
            "date": {"type": "string", "format": "date-time"},
            "kind": {"type": "string",
                     "description": "purchase, quota, send, refund or alert."},
            "login": {"type": "string", "nullable": True},
            "from": {"type": "string", "enum": ["outside", "account", "quota", "spent"]},
            "to": {"type": "string", "enum": ["outside", "account", "quota", "spent"]},
            "amount": {**_CREDITS, "minimum": 0},
            "reference": {"type": "string"},
        },
    },
}

_STRINGS = {"type": "array", "items": {"type": "string"}}


def _paths() -> dict[str, Any]:
    account = [_ACCOUNT]
    user = [_ACCOUNT, _LOGIN]
    return {
        "/1.0/openapi.json": {"get": {
            "operationId": "getOpenApi", "summary": "This document.", "security": [],
            "tags": ["reference"],
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
        }},
        "/1.0/sms/ptts": {"get": {
            "operationId": "getPtt", "summary": "Describe an operator state (ptt) code.",
            "tags": ["reference"], "security": [],
            "parameters": [{"name": "ptt", "in": "query", "required": True,
                            "schema": {"type": "integer"}}],
            "responses": {
                "200": _json(_ref("PttDetails"), "The code's details."),
                "400": _json(_ref("Error"), "Missing or not a number."),
                "404": _json(_ref("Error"), "Unknown code."),
            },
        }},
        "/1.0/sms": {
            "get": {"operationId": "listAccounts", "summary": "Account names.",
                    "description": "Those the token covers.",
                    "tags": ["accounts"],
                    "responses": {"200": _json(_STRINGS, "Account names."), **_errors()}},
            "post": {"operationId": "createAccount", "summary": "Create an account.",
                     "tags": ["accounts"], "requestBody": _body(_ref("AccountCreation")),
                     "responses": {"201": _json(_ref("Account"), "Created."),
                                   **_errors("400", "403", "409", "413")}},
        },
        "/1.0/sms/{account}": {
            "parameters": account,
            "get": {"operationId": "getAccount", "summary": "An account.",
                    "tags": ["accounts"],
                    "responses": {"200": _json(_ref("Account"), "The account."),
                                  **_errors("400")}},
            "put": {"operationId": "updateAccount",
                    "summary": "Change callBack, stopClause, retention days.",
                    "tags": ["accounts"], "requestBody": _body(_ref("AccountUpdate")),
                    "responses": {"200": _json(_ref("Account"), "The account."),
                                  **_errors("400", "413")}},
        },
        "/1.0/sms/{account}/credits": {
            "parameters": account,
            "post": {"operationId": "creditAccount",
                     "summary": "Top up the account (recorded in the ledger).",
                     "tags": ["accounts"], "requestBody": _body(_ref("CreditPurchase")),
                     "responses": {"200": _json(_ref("Account"), "The account."),
                                   **_errors("400", "413")}},
        },
        "/1.0/sms/{account}/ledger": {
            "parameters": account,
            "get": {"operationId": "listLedger",
                    "summary": "Credit movements, oldest first.", "tags": ["accounts"],
                    "parameters": [_LIMIT, _query(
                        "after", "Cursor: entries with a larger id (X-Next-Cursor).",
                        {"type": "integer", "minimum": 0})],
                    "responses": {"200": _json({"type": "array",
                                                "items": _ref("LedgerEntry")},
                                               "One page of entries.", _PAGE_HEADERS),
                                  **_errors("400")}},
        },
        "/1.0/sms/{account}/senders": {
            "parameters": account,
            "get": {"operationId": "listSenders", "summary": "Declared senders.",
                    "tags": ["senders"],
                    "responses": {"200": _json(_STRINGS, "Senders."), **_errors("400")}},
            "post": {"operationId": "addSender", "summary": "Declare a sender.",
                     "tags": ["senders"], "requestBody": _body(_ref("Sender")),
                     "responses": {"201": _json(_ref("Sender"), "Declared."),
                                   **_errors("400", "409", "413")}},
        },
        "/1.0/sms/{account}/senders/{sender}": {
            "parameters": [_ACCOUNT, _SENDER],
            "get": {"operationId": "getSender", "summary": "A declared sender.",
                    "tags": ["senders"],
                    "responses": {"200": _json(_ref("Sender"), "The sender."),
                                  **_errors("400")}},
            "delete": {"operationId": "removeSender", "summary": "Remove a sender.",
                       "tags": ["senders"],
                       "responses": {"204": {"description": "Removed."}, **_errors()}},
        },
        "/1.0/sms/{account}/users": {
            "parameters": account,
            "get": {"operationId": "listUsers", "summary": "API user logins.",
                    "tags": ["users"],
                    "responses": {"200": _json(_STRINGS, "Logins."), **_errors("400")}},
            "post": {"operationId": "createUser", "summary": "Create an API user.",
                     "tags": ["users"], "requestBody": _body(_ref("UserCreation")),
                     "responses": {"201": _json(_ref("User"), "Created."),
                                   **_errors("400", "409", "413")}},
        },
        "/1.0/sms/{account}/users/{login}": {
            "parameters": user,
            "get": {"operationId": "getUser", "summary": "An API user (sms.User).",
                    "tags": ["users"],
                    "responses": {"200": _json(_ref("User"), "The user."),
                                  **_errors("400")}},
            "put": {"operationId": "updateUser", "summary": "Change an API user.",
                    "tags": ["users"], "requestBody": _body(_ref("UserUpdate")),
                    "responses": {"200": _json(_ref("User"), "The user."),
                                  **_errors("400", "409", "413")}},
            "delete": {"operationId": "deleteUser",
                       "summary": "Delete a user; its quota goes back to the account.",
                       "tags": ["users"],
                       "responses": {"204": {"description": "Deleted."}, **_errors()}},
        },
        "/1.0/sms/{account}/users/{login}/outgoing": {
            "parameters": user,
            "get": {"operationId": "listOutgoing",
                    "summary": "Ids of the user's messages, newest first.",
                    "tags": ["messages"],
                    "parameters": [
                        _LIMIT,
                        _query("before", "Cursor: messages with a smaller id "
                                         "(X-Next-Cursor).", {"type": "integer",
                                                              "minimum": 1}),
                        _query("ptt", "Current operator state.", {"type": "integer"}),
                        _query("receiver", "Recipient, international format.",
                               {"type": "string"}),
                        _query("sender", "Sender.", {"type": "string"}),
                        _query("tag", "Tag given at send time.", {"type": "string"}),
                        _query("creationDatetime.from", "Created at or after (ISO 8601, "
                               "UTC unless an offset is given).",
                               {"type": "string", "format": "date-time"}),
                        _query("creationDatetime.to", "Created at or before; includes the "
                               "whole second it names.",
                               {"type": "string", "format": "date-time"}),
                    ],
                    "responses": {"200": _json({"type": "array",
                                                "items": {"type": "integer"}},
                                               "One page of ids.", _PAGE_HEADERS),
                                  **_errors("400")}},
        },
        "/1.0/sms/{account}/incoming": {
            "parameters": account,
            "get": {"operationId": "listIncoming",
                    "summary": "Ids of the messages handsets sent to the account, newest "
                               "first.",
                    "tags": ["messages"],
                    "parameters": [
                        _LIMIT,
                        _query("before", "Cursor: messages with a smaller id "
                                         "(X-Next-Cursor).", {"type": "integer",
                                                              "minimum": 1}),
                    ],
                    "responses": {"200": _json({"type": "array",
                                                "items": {"type": "integer"}},
                                               "One page of ids.", _PAGE_HEADERS),
                                  **_errors("400")}},
        },
        "/1.0/sms/{account}/outgoing/export": {
            "parameters": account,
            "get": {"operationId": "exportOutgoing",
                    "summary": "The account's outgoing history, oldest first, streamed: "
                               "CSV (a header line of OVH's field names) or JSON lines.",
                    "tags": ["messages"],
                    "parameters": [
                        {**_query("from", "From this day (2026-11-23) or ISO 8601 time.",
                                  {"type": "string"}), "required": True},
                        {**_query("to", "To this day, included, or time.",
                                  {"type": "string"}), "required": True},
                        _query("login", "Only this API user's messages.", {"type": "string"}),
                        _query("format", "csv (default) or jsonl.",
                               {"type": "string", "enum": ["csv", "jsonl"]}),
                    ],
                    "responses": {"200": {"description": "The export.", "content": {
                        "text/csv": {"schema": {"type": "string"}},
                        "application/jsonl": {"schema": {"type": "string"}}}},
                        **_errors("400")}},
        },
        "/1.0/sms/{account}/incoming/{id}": {
            "parameters": [*account, {"name": "id", "in": "path", "required": True,
                                      "schema": {"type": "integer", "minimum": 1}}],
            "get": {"operationId": "getIncoming",
                    "summary": "One incoming message (sms.Incoming).",
                    "tags": ["messages"],
                    "responses": {"200": _json(_ref("Incoming"), "The message."),
                                  **_errors("400")}},
        },
        "/1.0/sms/{account}/users/{login}/outgoing/{id}": {
            "parameters": [*user, {"name": "id", "in": "path", "required": True,
                                   "schema": {"type": "integer", "minimum": 1}}],
            "get": {"operationId": "getOutgoing",
                    "summary": "One message (sms.Outgoing) with its state history.",
                    "tags": ["messages"],
                    "responses": {"200": _json(_ref("Outgoing"), "The message."),
                                  **_errors("400")}},
        },
    }


def document() -> dict[str, Any]:
    return copy.deepcopy({
        "openapi": "3.0.3",
        "info": {
            "title": "http2sms-gateway admin API",
            "version": "1.0",
            "description": "Manage accounts, senders, API users and messages with the "
                           "objects and field names of OVHcloud's /sms API. Credits are "
                           "JSON numbers with at most 2 decimals.",
        },
        "servers": [{"url": "/"}],
        "security": [{"adminToken": []}],
        "tags": [{"name": n} for n in ("accounts", "senders", "users", "messages",
                                       "reference")],
        "paths": _paths(),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"adminToken": {
                "type": "http", "scheme": "bearer",
                "description": "admin.token from the config (HTTP2SMS_ADMIN_TOKEN), for "
                               "every account, or a token made with `http2sms token "
                               "create`, for the accounts it was made for.",
            }},
        },
    })
