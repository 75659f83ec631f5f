"""featurebeam/redact.py: credentials never reach run.json's Beam options, dead letters or logs."""

from __future__ import annotations

import io
import json
import logging

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from featurebeam import redact
from featurebeam.deadletter import DeadLetter

SA_KEY = {
    "type": "service_account",
    "project_id": "audio-prod",
    "private_key_id": "5f1c0ffee5f1c0ffee5f1c0ffee5f1c0ffee5f1c",
    "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n",
    "client_email": "extract@audio-prod.iam.gserviceaccount.com",
}
# (text, the secrets it holds, what must survive)
CASES = [
    (json.dumps(SA_KEY), ["MIIEvQIBADAN", "5f1c0ffee"], ["extract@audio-prod.iam.gserviceaccount.com", "audio-prod"]),
    (f"cannot parse {json.dumps(json.dumps(SA_KEY))}", ["MIIEvQIBADAN", "5f1c0ffee"], ["client_email"]),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", ["MIIEowIBAAKCAQEA"], []),
    (repr({"refresh_token": "1//0gLongRefreshTokenValue_abcdef", "client_id": "123.apps"}), ["1//0gLong"], ["123.apps"]),
    ("403 Forbidden: Authorization: Bearer ya29.a0AfB_byC-secretvalue", ["ya29.a0AfB", "secretvalue"], ["403 Forbidden"]),
    ("GET https://storage.googleapis.com/b/o.wav?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=9f8e7d6c5b4a",
     ["9f8e7d6c5b4a"], ["https://storage.googleapis.com/b/o.wav", "X-Goog-Algorithm=GOOG4-RSA-SHA256"]),
    ("fetch https://alice:hunter2@mirror.example.com/audio.tar failed", ["hunter2"], ["alice", "mirror.example.com/audio.tar"]),
    ("AccountName=acct;AccountKey=c2VjcmV0S2V5PT0=;EndpointSuffix=core.windows.net", ["c2VjcmV0S2V5"], ["AccountName=acct"]),
    ("s3 said no to AKIAIOSFODNN7EXAMPLE", ["AKIAIOSFODNN7EXAMPLE"], ["s3 said no"]),
    ("https://www.googleapis.com/x?key=AIzaSyA-1234567890abcdefghijklmnopqrstu", ["AIzaSyA-1234567890"], ["googleapis.com/x"]),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", ["dozjgNryP4J3"], ["jwt"]),
    ("password=s3cr3t&user=bob", ["s3cr3t"], ["user=bob"]),
]


@pytest.mark.parametrize("text, secrets, kept", CASES)
def test_scrub_masks_credentials_and_keeps_the_rest(text, secrets, kept):
    cleaned = redact.scrub(text)
    for secret in secrets:
        assert secret not in cleaned, cleaned
    for part in kept:
        assert part in cleaned, cleaned
    assert redact.REDACTED in cleaned
    assert redact.scrub(cleaned) == cleaned  # idempotent


def test_ordinary_messages_are_unchanged():
    for text in ("unexpected token at byte 44: not a WAV file", "gs://bucket/clips/a.wav not found (404)",
                 "key 'x' is listed twice", "decoder crashed with signal 11", "sample_rate=16000 expected, got 8000"):
        assert redact.scrub(text) == text
    assert json.loads(redact.scrub(json.dumps(SA_KEY)))["private_key"] == redact.REDACTED  # still valid JSON


def test_beam_options_with_credentials_are_redacted_by_name_and_value():
    options = PipelineOptions([
        "--runner=FnApiRunner",
        "--s3_access_key_id=AKIAIOSFODNN7EXAMPLE",
        "--s3_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "--s3_session_token=FwoGZXIvYXdzEJr//////////wEaDEXAMPLE",
        "--azure_connection_string=DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0S2V5PT0=",
        "--service_account_email=extract@audio-prod.iam.gserviceaccount.com",
        "--dataflow_kms_key=projects/p/locations/l/keyRings/r/cryptoKeys/k",
        "--experiments=use_runner_v2",
        "--experiments=auth_token=abcdef123456",
        "--sdk_location=https://ci:pa55word@artifacts.example.com/beam.tar.gz",
    ]).get_all_options(drop_default=True)  # what run.json's beam.options records
    redacted = redact.redact_options(options)
    text = json.dumps(redacted)
    for secret in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "FwoGZXIvYXdz", "c2VjcmV0S2V5", "abcdef123456", "pa55word"):
        assert secret not in text
    assert redacted["s3_secret_access_key"] == redact.REDACTED == redacted["azure_connection_string"]
    assert redacted["service_account_email"] == "extract@audio-prod.iam.gserviceaccount.com"  # an identity, not a secret
    assert redacted["dataflow_kms_key"] == "projects/p/locations/l/keyRings/r/cryptoKeys/k"
    assert redacted["experiments"] == ["use_runner_v2", f"auth_token={redact.REDACTED}"]
    assert redacted["sdk_location"] == f"https://ci:{redact.REDACTED}@artifacts.example.com/beam.tar.gz"
    assert options["s3_secret_access_key"].startswith("wJalr")  # the input is not changed
    assert not any(redact.is_secret_option(n) for n in ("no_auth", "gcp_oauth_scopes", "service_account_email",
                                                        "impersonate_service_account", "dataflow_kms_key"))


def test_dead_letters_never_carry_credentials():
    exc = OSError(f"403 reading https://h/o.wav?X-Goog-Signature=9f8e7d6c: token file said {json.dumps(SA_KEY)}")
    letter = DeadLetter.from_exception(key="gs://b/o.wav", uri="https://h/o.wav?X-Goog-Signature=9f8e7d6c", stage="read", exc=exc)
    record = letter.to_json()
    assert "9f8e7d6c" not in record and "MIIEvQIBADAN" not in record
    assert letter.key == "gs://b/o.wav" and "extract@audio-prod" in letter.message
    assert DeadLetter.from_json(record) == letter


def test_log_records_are_scrubbed_on_the_handlers():
    stream = io.StringIO()
    root = logging.getLogger("fb_redact_test")
    root.propagate = False
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        redact.scrub_logs(root)
        redact.scrub_logs(root)  # once only
        assert sum(isinstance(f, redact.ScrubFilter) for f in handler.filters) == 1
        logging.getLogger("fb_redact_test.child").warning("refreshing %s with %s", "creds", "Bearer ya29.a0AfB_secret")
        assert stream.getvalue() == f"refreshing creds with Bearer {redact.REDACTED}\n"
    finally:
        root.removeHandler(handler)


@pytest.mark.slow
def test_run_json_records_beam_options_without_credentials(tmp_path):
    from pipelines import extract

    run = extract.run(["--dataset=sample", "--features=summary", "--limit=2", f"--output={tmp_path}", "--run_id=r",
                       "--decode_in_process", "--s3_secret_access_key=wJalrXUtnFEMI/K7MDENG",
                       "--service_account_email=extract@audio-prod.iam.gserviceaccount.com"])
    text = open(f"{run['outputs']['run_dir']}/run.json").read()
    assert "wJalrXUtnFEMI" not in text
    assert json.loads(text)["beam"]["options"]["service_account_email"] == "extract@audio-prod.iam.gserviceaccount.com"
