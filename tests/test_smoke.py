from tests.conftest import Harness


async def test_send_accepted(harness: Harness) -> None:
    status, body = await harness.send(contentType="application/json")
    assert status == 200
    assert body == '{"status":100,"creditLeft":"999","SmsIds":["1"]}'
