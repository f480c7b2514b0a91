"""README's error and configuration tables say what the code does."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from gateway.config import Settings, env_name
from gateway.core.errors import ErrorCode

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_error_table_matches_the_code() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| ([A-Z_]+) \|", README, re.MULTILINE)
    documented = {(code, int(http), grpc) for code, http, grpc in rows}
    actual = {(e.code, e.http_status, e.grpc_status) for e in ErrorCode}
    assert documented == actual


def test_configuration_table_lists_every_flag() -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"^\| `{flag}` \| `{env_name(f.name)}`", README, re.MULTILINE), flag
