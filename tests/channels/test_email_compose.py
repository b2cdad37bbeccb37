"""The e-mail channel's direct writer gives the very bytes of the MIME classes.

Most messages (ASCII headers short enough not to fold) are written out directly,
because the MIME classes cost most of a worker's time per e-mail; every other message
goes through the classes. The two must never differ, whatever the body: this holds
them byte for byte equal (the random boundary and the date aside).
"""

from __future__ import annotations

import re
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from notifier.channels.base import OutgoingMessage
from notifier.channels.email import EmailChannel, _recipient, _text_to_html

CHANNEL = EmailChannel("smtp://127.0.0.1:25?from=notifier%40example.com&starttls=no")
#: Line ends of every kind, QP's specials, non-ASCII of 2 to 4 bytes, markup.
TEXT = st.lists(st.sampled_from([*"ab =\t\r\n.-é€😀x<>&\"'", "y" * 80]), max_size=60).map("".join)


def message(title: str, body: str, name: str = "", address: str = "a.b@example.com",
            html: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        delivery_id=uuid.uuid4(), recipient_id="r", address=address, type="alert",
        priority="normal", title=title, body=body, data={}, recipient_name=name, html=html,
    )


def both(outgoing: OutgoingMessage) -> tuple[bytes | None, bytes]:
    to = _recipient(str(outgoing.address), outgoing.recipient_name or "")
    html = outgoing.html or _text_to_html(outgoing.body)
    return (CHANNEL._compose_plain(outgoing, to, html),
            CHANNEL._compose_classic(outgoing, to, html))


def without_boundary_and_date(mail: bytes) -> bytes:
    mail = re.sub(rb"={15}\d{19}==", b"BOUNDARY", mail)
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", mail)


@settings(max_examples=400, deadline=None)
@given(title=st.text(st.sampled_from("abc d-:"), max_size=90), body=TEXT,
       html=st.none() | TEXT, name=st.sampled_from(["", "Ada L", "Ada, L.", 'Ada "A" L', "Jürgen"]))
def test_the_direct_writer_gives_the_bytes_of_the_mime_classes(title, body, html, name):
    direct, classic = both(message(title, body, name, html=html))
    if direct is not None:
        assert without_boundary_and_date(direct) == without_boundary_and_date(classic)


def test_a_plain_message_is_written_directly():
    direct, _ = both(message("Disk almost full", "Only 2% left.\nClean up /var."))
    assert direct is not None
    assert b"Subject: Disk almost full\r\n" in direct


def test_what_would_be_encoded_or_folded_goes_through_the_mime_classes():
    for outgoing in (
        message("Café fermé", "body"),  # an encoded word
        message("word " * 20, "body"),  # folded
        message("title", "body", address="jürgen@example.com"),  # SMTPUTF8
    ):
        direct, classic = both(outgoing)
        assert direct is None and classic
