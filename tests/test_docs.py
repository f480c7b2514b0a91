"""README's error and configuration tables say what the code does, and its Quickstart what the
server answers."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest
import requests

from clients import cli
from gateway.config import Settings, env_name
from gateway.core.errors import ErrorCode
from gateway.serve import Gateway

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_error_table_matches_the_code() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| ([A-Z_]+) \|", README, re.MULTILINE)
    documented = {(code, int(http), grpc) for code, http, grpc in rows}
    actual = {(e.code, e.http_status, e.grpc_status) for e in ErrorCode}
    assert documented == actual


def test_configuration_table_lists_every_flag() -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"^\| `{flag}` \| `{env_name(f.name)}`", README, re.MULTILINE), flag


def quickstart_commands() -> list[tuple[Path, list[str], str]]:
    """The Quickstart's commands after `make serve`: (directory, argv, the output shown below)."""
    block = README.split("Then, from the checkout", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    here, commands = ROOT, []
    for i, line in enumerate(lines):
        if line.startswith("cd "):
            here = here / line.removeprefix("cd ")
        elif line and not line.startswith("#"):
            shown = lines[i + 1] if i + 1 < len(lines) else ""
            commands.append((here, shlex.split(line), shown.removeprefix("# ")))
    return commands


def test_quickstart_curl_examples_answer_as_shown(http_url: str) -> None:
    ran = 0
    for here, argv, shown in quickstart_commands():
        if argv[0] != "curl":
            continue
        options, url = argv[1:-1], argv[-1].replace("http://127.0.0.1:5000", http_url)
        headers, files, data = {}, [], None
        for flag, value in zip(options[::2], options[1::2], strict=True):
            if flag == "-H":
                name, _, text = value.partition(": ")
                headers[name] = text
            elif flag == "--data-binary":
                data = (here / value.removeprefix("@")).read_bytes()
            elif flag == "-F":
                name, _, path = value.partition("=@")
                files.append((name, (path, (here / path).read_bytes())))
            else:
                raise AssertionError(f"a curl option the test does not know: {flag}")
        answer = requests.post(url, data=data, files=files or None, headers=headers, timeout=30)
        assert answer.status_code == 200, (argv, answer.text)
        if shown.startswith("["):
            assert answer.json() == json.loads(shown), argv
        ran += 1
    assert ran == 3


def test_quickstart_cli_examples_print_the_same_over_both_protocols(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = []
    for here, argv, _ in quickstart_commands():
        if not argv[0].endswith("/image-gateway-client"):
            continue
        assert (here / argv[0]).resolve() == ROOT / ".venv/bin/image-gateway-client"
        monkeypatch.chdir(here)
        args = [
            a.replace("http://127.0.0.1:5000", gateway.http_url).replace(
                "grpc://127.0.0.1:50051", f"grpc://{gateway.grpc_target}"
            )
            for a in argv[1:]
        ]
        assert cli.main(args) == 0
        printed.append(capsys.readouterr().out)
    assert len(printed) == 2
    assert printed[0] == printed[1]
    assert [r["output"] for r in json.loads(printed[0])] == [[427, 640, 3], [128, 128, 3]]
