import gc

from gateway.server import spare_the_start_up_heap
from tests.conftest import Harness


async def test_send_accepted(harness: Harness) -> None:
    status, body = await harness.send(contentType="application/json")
    assert status == 200
    assert body == '{"status":100,"creditLeft":"999","SmsIds":["1"]}'


def test_the_start_up_heap_is_left_out_of_full_collections() -> None:
    gc.unfreeze()
    try:
        spare_the_start_up_heap()
        assert gc.get_freeze_count() > 1000  # modules, tables: everything alive at the call
    finally:
        gc.unfreeze()  # the test process goes on collecting as usual
