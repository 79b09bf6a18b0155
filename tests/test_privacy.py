"""Pseudonyms on the bus (issue 10): the key, the pseudonyms, the finding they make, the config that asks for them."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from edge_agent.bus.finding import build_finding, encode, load_schema, message_id
from edge_agent.bus.pseudonym import finding_message_id, pseudonymise
from edge_agent.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from edge_agent.errors import ConfigError
from edge_agent.privacy import KEY_ENV, MIN_KEY_BYTES, PrivacyKeyError, Pseudonymiser, read_key
from tests.test_finding import SERIES, SOP_A, SOP_B, STUDY, T0, make_input

REPO = Path(__file__).resolve().parent.parent
KEY = b"k" * 40
# PS3.5 9.1: components of digits without leading zeros, dot-separated, at most 64 characters.
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def expected_uid(key: bytes, uid: str) -> str:
    """What a subscriber holding the key computes for a UID: the documented recipe, written out again."""
    digest = hmac.new(key, b"uid\x1f" + uid.encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


# -- the key ----------------------------------------------------------------------------------------------------


def test_the_key_comes_from_the_file_without_its_line_break(tmp_path: Path) -> None:
    path = tmp_path / "privacy.key"
    path.write_bytes(b"a" * 64 + b"\n")
    assert read_key(path, {KEY_ENV: "ignored-when-a-file-is-named-" + "x" * 32}) == b"a" * 64
    path.write_bytes(b"b" * 64 + b"\r\n")
    assert read_key(path, {}) == b"b" * 64


def test_the_key_comes_from_the_environment_without_a_file() -> None:
    assert read_key(None, {KEY_ENV: "e" * 32}) == b"e" * 32


@pytest.mark.parametrize(
    ("content", "env", "option", "text"),
    [
        (None, {}, "key_file", f"there is no key: name a key file here or set {KEY_ENV}"),
        (None, {KEY_ENV: ""}, "key_file", "there is no key"),
        (None, {KEY_ENV: "short-secret-value"}, KEY_ENV, f"holds 18 bytes; a key needs at least {MIN_KEY_BYTES}"),
        (b"short-secret-value\n", {}, "key_file", "holds 18 bytes"),
        ("missing", {}, "key_file", "No such file or directory"),
    ],
)
def test_a_missing_or_short_key_names_where_it_was_looked_for_and_never_shows_it(
    tmp_path: Path, content: bytes | str | None, env: dict[str, str], option: str, text: str
) -> None:
    path: Path | None = None
    if content is not None:
        path = tmp_path / "privacy.key"
        if isinstance(content, bytes):
            path.write_bytes(content)
    with pytest.raises(PrivacyKeyError) as info:
        read_key(path, env)
    assert info.value.option == option
    assert text in info.value.message
    assert "short-secret-value" not in str(info.value)


# -- the pseudonyms ---------------------------------------------------------------------------------------------


def test_pseudonyms_are_keyed_deterministic_and_shaped_like_what_they_replace() -> None:
    p, same, other = Pseudonymiser(KEY), Pseudonymiser(KEY), Pseudonymiser(b"o" * 40)
    pseudo = p.uid(SERIES)
    assert pseudo == same.uid(SERIES) == expected_uid(KEY, SERIES)
    assert pseudo != other.uid(SERIES) and pseudo != p.uid(STUDY)
    assert pseudo.startswith("2.25.") and UID.match(pseudo) and len(pseudo) <= 64
    accession, ae = p.accession("ACC123"), p.ae_title("CT_SCANNER_1")
    assert re.fullmatch(r"[0-9A-F]{16}", accession) and re.fullmatch(r"[0-9A-F]{16}", ae)
    # The kind is part of the input: the same text as an accession number and as an AE title differ.
    assert p.accession("ABC") != p.ae_title("ABC")
    assert (p.uid(""), p.accession(""), p.ae_title("")) == ("", "", "")


def test_the_pseudonymiser_never_shows_its_key() -> None:
    p = Pseudonymiser(KEY)
    assert "k" * 10 not in repr(p) and "k" * 10 not in str(p)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Pseudonymiser(b"short")


# -- the finding ------------------------------------------------------------------------------------------------


def test_a_pseudonymised_finding_validates_and_carries_no_identifier() -> None:
    p = Pseudonymiser(KEY)
    inp = make_input(failed_instance_uids=["1.2.826.0.1.3680043.8.498.14"], instances_received=3)
    finding = build_finding(pseudonymise(inp, p))
    jsonschema.Draft202012Validator(load_schema()).validate(finding)
    payload = encode(finding)
    for identifier in (SERIES, STUDY, SOP_A, SOP_B, "1.2.826.0.1.3680043.8.498.14", "ACC123", "CT_SCANNER_1",
                       "EDGE_AGENT", message_id(SERIES, "ct-demo", "0.1.0", 0, T0)):
        assert identifier.encode() not in payload, identifier
    assert finding["pseudonymised"] is True
    assert finding["series_instance_uid"] == expected_uid(KEY, SERIES)
    assert finding["study_instance_uid"] == expected_uid(KEY, STUDY)
    assert finding["sop_instance_uids"] == [expected_uid(KEY, SOP_A), expected_uid(KEY, SOP_B)]
    assert finding["driving_instance_uid"] == finding["labels"][0]["driving_instance_uid"] == expected_uid(KEY, SOP_B)
    assert finding["heatmap"]["driving_instance_uid"] == expected_uid(KEY, SOP_B)
    assert finding["accession_number"] == p.accession("ACC123")
    assert (finding["calling_ae_title"], finding["called_ae_title"]) == (p.ae_title("CT_SCANNER_1"),
                                                                         p.ae_title("EDGE_AGENT"))
    # The finding id is the Nats-Msg-Id the pipeline computes before building: both come from the pseudonym.
    assert finding["finding_id"] == finding_message_id(SERIES, "ct-demo", "0.1.0", 0, T0, p)
    # Everything that is not an identifier is untouched.
    plain = build_finding(inp)
    for key in ("site", "modality", "body_part", "route", "model", "priority", "revision", "timings", "agent",
                "instances_received", "instances_inferred", "instances_failed"):
        assert finding[key] == plain[key], key
    assert finding["heatmap"]["bbox"] == plain["heatmap"]["bbox"]
    assert [r["score"] for r in finding["labels"]] == [r["score"] for r in plain["labels"]]


def test_revisions_of_a_series_share_its_pseudonym_and_keep_distinct_ids() -> None:
    p = Pseudonymiser(KEY)
    first = build_finding(pseudonymise(make_input(revision=0), p))
    second = build_finding(pseudonymise(make_input(revision=1), p))
    assert first["series_instance_uid"] == second["series_instance_uid"]
    assert first["finding_id"] != second["finding_id"]


def test_without_pseudonymise_the_finding_is_as_before() -> None:
    finding = build_finding(make_input())
    assert finding["pseudonymised"] is False
    assert (finding["series_instance_uid"], finding["accession_number"], finding["calling_ae_title"]) == (
        SERIES, "ACC123", "CT_SCANNER_1")
    assert finding["finding_id"] == message_id(SERIES, "ct-demo", "0.1.0", 0, T0) == finding_message_id(
        SERIES, "ct-demo", "0.1.0", 0, T0, None)
    assert dataclasses.replace(make_input()).pseudonymised is False


# -- the configuration ------------------------------------------------------------------------------------------


def _raw(**privacy: object) -> dict[str, object]:
    return {"site": "a", "state_dir": "/tmp/x", "privacy": privacy}


def test_the_config_holds_a_pseudonymiser_only_when_asked(tmp_path: Path) -> None:
    assert parse_config(_raw(), env={}).privacy.pseudonymiser is None
    assert parse_config(_raw(pseudonymise=False), env={KEY_ENV: "x" * 40}).privacy.pseudonymiser is None
    config = parse_config(_raw(pseudonymise=True), env={KEY_ENV: "s" * 40})
    p = config.privacy.pseudonymiser
    assert p is not None and p.uid(SERIES) == expected_uid(b"s" * 40, SERIES)
    assert "s" * 10 not in repr(config) and "s" * 10 not in str(config.model_dump())
    key_file = tmp_path / "privacy.key"
    key_file.write_bytes(b"f" * 32 + b"\n")
    from_file = parse_config(_raw(pseudonymise=True, key_file=str(key_file)), env={KEY_ENV: "s" * 40})
    assert from_file.privacy.pseudonymiser is not None
    assert from_file.privacy.pseudonymiser.uid(SERIES) == expected_uid(b"f" * 32, SERIES)
    # load_config's copy (relative paths resolved) keeps it.
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"site": "a", "state_dir": "state", "privacy": {"pseudonymise": True}}))
    loaded = load_config(cfg, env={KEY_ENV: "s" * 40})
    assert loaded.privacy.pseudonymiser is not None


@pytest.mark.parametrize(
    ("privacy", "env", "problem"),
    [
        ({"pseudonymise": True}, {}, f"key_file: pseudonymise is on but there is no key: name a key file here "
                                     f"or set {KEY_ENV}"),
        ({"pseudonymise": True}, {KEY_ENV: "tooshort"}, f"{KEY_ENV}: holds 8 bytes; a key needs at least 32"),
        ({"pseudonymise": True, "key_file": "/nonexistent/privacy.key"}, {},
         "key_file: cannot read /nonexistent/privacy.key: No such file or directory"),
    ],
)
def test_a_missing_or_short_key_is_a_config_error_naming_it(
    privacy: dict[str, object], env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_raw(**privacy), env=env)
    [(path, message)] = info.value.problems
    assert path == "privacy" and message.startswith(problem), message


def test_the_key_itself_is_not_a_config_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_raw(pseudonymise=True, key="x" * 40), env={KEY_ENV: "s" * 40})
    assert dict(info.value.problems) == {"privacy.key": "unknown key"}


def test_a_relative_key_file_is_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "privacy.key").write_bytes(b"r" * 32)
    cfg = tmp_path / "etc" / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"site": "a", "state_dir": "state",
                                   "privacy": {"pseudonymise": True, "key_file": "privacy.key"}}))
    config = load_config(cfg, env={})
    assert config.privacy.key_file == tmp_path / "etc" / "privacy.key"
    assert config.privacy.pseudonymiser is not None
    assert config.privacy.pseudonymiser.uid(SERIES) == expected_uid(b"r" * 32, SERIES)


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_serve_and_check_config_exit_3_without_a_key(tmp_path: Path, command: str) -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["model_repository"] = str(REPO / "engines")
    raw["privacy"] = {"pseudonymise": True}
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    args = [command, str(cfg)] if command == "check-config" else [command, "--config", str(cfg)]
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    env[KEY_ENV] = "secret-but-short"
    result = subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env=env)
    assert result.returncode == 3, result.stderr
    assert f"privacy: {KEY_ENV}: holds 16 bytes; a key needs at least 32" in result.stderr
    assert "secret-but-short" not in result.stderr + result.stdout
    assert not (tmp_path / "state").exists()  # nothing started
