"""Messages from handsets (replies, STOP): kept for the account they answer.

The operator hands them to the dispatcher (`Operator` sink `inbound`), which calls
`IncomingKeeper` and acknowledges them to the network once it returns: a failure here
leaves them unacknowledged, and the network sends them again. The account is the store's
decision (`DeliveryStore.add_incoming`): the sender of the newest message sent to that
handset from the number it wrote to, else the account that declared that number. One no
account claims is logged and dropped. The parts of a long message are stored as they come
(`DeliveryStore.add_incoming_parts`), each before it is acknowledged, and the message is
kept once the last one is; a message or part the network sends again is kept once.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from gateway.operators.base import Inbound
from gateway.records import IncomingMessage, IncomingPart
from gateway.store import DeliveryStore

log = structlog.get_logger("gateway.incoming")


class IncomingKeeper:
    def __init__(self, store: DeliveryStore) -> None:
        self._store = store

    async def __call__(self, messages: Sequence[Inbound]) -> None:
        whole = [m for m in messages if m.part is None]
        parts = [m for m in messages if m.part is not None]
        if whole:
            ids = await self._store.add_incoming([
                IncomingMessage(0, 0, m.reference, m.sender, m.receiver, m.body, "", m.at)
                for m in whole])
            for message, new_id in zip(whole, ids, strict=True):
                _logged(message, new_id)
        if parts:
            found = await self._store.add_incoming_parts([
                IncomingPart(m.reference, m.sender, m.receiver, *m.part, m.body, m.at)
                for m in parts if m.part is not None])
            for message, message_id in zip(parts, found, strict=True):
                if message_id is None:
                    log.debug("incoming_part_kept", sender=message.sender,
                              receiver=message.receiver, part=message.part)
                elif message_id and message.part is not None:
                    log.info("incoming_kept", id=message_id, sender=message.sender,
                             receiver=message.receiver, parts=message.part.total)
                else:
                    _logged(message, message_id)


def _logged(message: Inbound, new_id: int) -> None:
    if new_id:
        log.info("incoming_kept", id=new_id, sender=message.sender,
                 receiver=message.receiver, length=len(message.body))
    else:
        log.warning("incoming_unclaimed", sender=message.sender,
                    receiver=message.receiver, reference=message.reference)
