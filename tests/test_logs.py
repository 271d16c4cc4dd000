"""What the logs say, as an operator asks: the canonical transaction line (every recipient's
answer, the Message-ID, the MTA's queue id), addresses shown as configured, and the
transcript with its redactions.
"""

from __future__ import annotations

import pytest

from pipeproxy.core.config import Config
from pipeproxy.core.message import HeaderScanner, queue_id, show_address

from test_session import OPENED
from transcript import TO_CLIENT, TO_UPSTREAM, C, U, play

GROUP = b"MAIL FROM:<Sender@Client.test> SIZE=200\r\nRCPT TO:<ok@legacy.test>\r\nRCPT TO:<gone@legacy.test>\r\nDATA\r\n"
MESSAGE = b"From: s@client.test\r\nMessage-ID:\r\n <1234.abcd@client.test>\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"
DIALOGUE = OPENED + [
    (C, GROUP),
    (TO_UPSTREAM, b"MAIL FROM:<Sender@Client.test> SIZE=200\r\n"),
    (U, b"250 2.1.0 Ok\r\n"),
    (TO_UPSTREAM, b"RCPT TO:<ok@legacy.test>\r\n"),
    (U, b"250 2.1.5 Ok\r\n"),
    (TO_UPSTREAM, b"RCPT TO:<gone@legacy.test>\r\n"),
    (U, b"550-5.1.1 <gone@legacy.test>: Recipient address rejected:\r\n550 5.1.1 User unknown\r\n"),
    (TO_UPSTREAM, b"DATA\r\n"),
    (U, b"354 go ahead\r\n"),
    (
        TO_CLIENT,
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550-5.1.1 <gone@legacy.test>: Recipient address rejected:\r\n"
        b"550 5.1.1 User unknown\r\n354 go ahead\r\n",
    ),
    (C, MESSAGE),
    (TO_UPSTREAM, MESSAGE),
    (U, b"250 2.0.0 Ok: queued as 4F3A1B2C9D\r\n"),
    (TO_CLIENT, b"250 2.0.0 Ok: queued as 4F3A1B2C9D\r\n"),
]


def test_the_transaction_line_says_what_happened_to_each_recipient_and_the_message():
    run = play(DIALOGUE)
    [line] = run.events("transaction")
    assert line["helo"] == "client.test"
    assert line["sender"] == "Sender@Client.test"
    assert line["recipients"] == [
        {"address": "ok@legacy.test", "code": 250},
        {
            "address": "gone@legacy.test",
            "code": 550,
            "reply": "5.1.1 <gone@legacy.test>: Recipient address rejected: 5.1.1 User unknown",
        },
    ]
    assert (line["recipients_accepted"], line["recipients_rejected"]) == (1, 1)
    assert line["message_id"] == "<1234.abcd@client.test>"
    assert line["queue_id"] == "4F3A1B2C9D"
    assert (line["reply_code"], line["outcome"]) == (250, "message accepted")
    assert line["size"] == len(MESSAGE) - 3
    assert run.events("session open") == [{"server": "127.0.0.1:2525"}]


def test_a_recipient_pipeproxy_refuses_itself_is_in_the_line_with_its_reply():
    run = play(
        OPENED
        + [
            (C, b"MAIL FROM:<s@x>\r\nRCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nRSET\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<a@y>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"RSET\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n250 Ok\r\n452 4.5.3 Error: too many recipients\r\n250 Ok\r\n"),
        ],
        Config(max_recipients=1),
    )
    [line] = run.events("transaction")
    assert line["recipients"] == [
        {"address": "a@y", "code": 250},
        {"address": "b@y", "code": 452, "reply": "4.5.3 Error: too many recipients"},
    ]
    assert line["outcome"] == "RSET command"


@pytest.mark.parametrize(
    ("mode", "sender", "recipient"),
    [("domain", "@Client.test", "@legacy.test"), ("hash", "#", "#")],
)
def test_addresses_can_be_kept_to_their_domain_or_a_keyed_hash(mode, sender, recipient):
    config = Config(log_addresses=mode, log_hash_key="k3y", transcript=True)
    run = play(DIALOGUE, config)
    [line] = run.events("transaction")
    logged = repr(run.logs)
    assert "Sender@" not in logged and "ok@" not in logged and "gone@" not in logged.replace("<gone@", "")
    assert line["sender"].startswith(sender) and line["sender"].endswith("@Client.test")
    assert all(r["address"].startswith(recipient) for r in line["recipients"])
    if mode == "hash":  # the same address, the same hash: searchable
        again = play(DIALOGUE, config).events("transaction")[0]
        assert again["sender"] == line["sender"] == show_address("Sender@Client.test", "hash", b"k3y")
        assert show_address("Sender@Client.test", "hash", b"other") != line["sender"]


def test_the_transcript_has_each_command_and_reply_and_never_content_or_auth_data():
    config = Config(transcript=True)
    run = play(
        DIALOGUE
        + [
            (C, b"AUTH PLAIN c2VjcmV0\r\n"),
            (TO_UPSTREAM, b"AUTH PLAIN c2VjcmV0\r\n"),
            (U, b"334 \r\n"),
            (TO_CLIENT, b"334 \r\n"),
            (C, b"bXlwYXNz\r\n"),
            (TO_UPSTREAM, b"bXlwYXNz\r\n"),
            (U, b"535 5.7.8 no\r\n"),
            (TO_CLIENT, b"535 5.7.8 no\r\n"),
            (C, b"STARTTLS\r\n"),
            (TO_CLIENT, b"502 5.5.1 Error: STARTTLS is not available through this proxy\r\n"),
        ],
        config,
    )
    lines = run.events("transcript")
    logged = repr(lines)
    assert "c2VjcmV0" not in logged and "bXlwYXNz" not in logged and "body" not in logged and "Subject" not in logged
    commands = [entry["line"] for entry in lines if entry["direction"] == "client"]
    assert commands == [
        "EHLO client.test", "MAIL FROM:<Sender@Client.test> SIZE=200", "RCPT TO:<ok@legacy.test>",
        "RCPT TO:<gone@legacy.test>", "DATA", "AUTH PLAIN [redacted]", "[SASL response]", "STARTTLS",
    ]
    replies = [(entry["code"], entry["direction"]) for entry in lines if "code" in entry]
    assert replies[:5] == [(220, "upstream")] + [(250, "upstream")] * 3 + [(550, "upstream")]
    assert replies[-1] == (502, "to client")
    assert play(DIALOGUE).events("transcript") == [], "off by default"


def test_the_message_id_is_found_however_the_content_is_cut_and_only_among_the_headers():
    content = b"From: a\r\nmessage-id: <x.1@y>\r\n\r\nMessage-ID: <in-body@y>\r\n"
    for cut in range(len(content)):
        scanner = HeaderScanner()
        scanner.feed(content[:cut])
        scanner.feed(content[cut:])
        scanner.finish()
        assert scanner.message_id == "<x.1@y>"
    scanner = HeaderScanner()
    scanner.feed(b"X-Long: " + b"a" * 300_000 + b"\r\nMessage-ID: <late@y>\r\n\r\n")
    assert scanner.message_id is None, "the header section is read within a bound"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("2.0.0 Ok: queued as 4F3A1B2C", "4F3A1B2C"),
        ("OK id=1sXYZa-000123-AB", "1sXYZa-000123-AB"),
        ("2.0.0 4ATK1a2b003 Message accepted for delivery", "4ATK1a2b003"),
        ("2.6.0 <a@b> [InternalId=1234] Queued mail for delivery", "1234"),
        ("ok 1700000000 qp 4242", "4242"),
        ("2.0.0 Ok", None),
    ],
)
def test_queue_ids_of_real_mtas_are_found_in_their_replies(reply, expected):
    assert queue_id(reply) == expected
