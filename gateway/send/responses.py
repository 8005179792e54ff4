"""The four answer formats of the send URL, byte for byte as OVH's http2sms.cgi writes them."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from html import escape as html_escape
from xml.sax.saxutils import escape as xml_escape


class ContentType(enum.StrEnum):
    TEXT = "text/plain"
    XML = "text/xml"
    APP_XML = "application/xml"
    JSON = "text/json"
    APP_JSON = "application/json"
    HTML = "text/html"


def content_type(value: str | None) -> ContentType | None:
    """The requested format; None when the value names no known format."""
    if value is None or value.strip() == "":
        return ContentType.TEXT
    try:
        return ContentType(value.strip().lower())
    except ValueError:
        return None


def success(fmt: ContentType, status: int, credit_left: str, ids: Sequence[int]) -> str:
    if fmt is ContentType.TEXT:
        return "\n".join(["OK", credit_left, *map(str, ids)])
    if fmt in (ContentType.JSON, ContentType.APP_JSON):
        return json.dumps({"status": status, "creditLeft": credit_left,
                           "SmsIds": [str(i) for i in ids]}, separators=(",", ":"))
    if fmt is ContentType.HTML:
        return _html("OK<br>" + "".join(f"{x}<br>" for x in (credit_left, *ids)))
    sms_ids = "".join(f"<smsId>{i}</smsId>" for i in ids)
    return (f'{_XML_DECL}<response><status>{status}</status>'
            f"<creditLeft>{xml_escape(credit_left)}</creditLeft>"
            f"<smsIds>{sms_ids}</smsIds></response>")


def failure(fmt: ContentType, status: int, message: str) -> str:
    if fmt is ContentType.TEXT:
        return f"KO\n{status} {message}"
    if fmt in (ContentType.JSON, ContentType.APP_JSON):
        return json.dumps({"status": status, "message": message}, separators=(",", ":"),
                          ensure_ascii=False)
    if fmt is ContentType.HTML:
        return _html(f"KO<br>{html_escape(message, quote=False)}<br>")
    return (f"{_XML_DECL}<response><status>{status}</status>"
            f"<message>{xml_escape(message)}</message></response>")


_XML_DECL = '<?xml version="1.0" encoding="UTF-8" ?>'

_HTML_HEAD = (
    '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
    '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
    '<html xmlns="http://www.w3.org/1999/xhtml">\n<HEAD>\n'
    '<meta http-equiv="Content-Type" content="text/html; charset=utf-8" />\n'
    "<TITLE>http2sms</TITLE>\n</HEAD>\n<BODY>"
)


def _html(body: str) -> str:
    return f"{_HTML_HEAD}{body}</BODY>\n</html>\n"
