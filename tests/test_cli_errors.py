"""Whatever goes wrong, `freezeframe` prints one line on stderr and exits with a specific code, never a traceback.

Usage errors exit 2; a FreezeframeError its own code (3 for invalid input); an OSError and an internal error 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import FakeService, Result, install_fake, run_cli, sample_set, subprocess_cli
from freezeframe import __version__, cli_lifecycle
from freezeframe.config import Settings
from freezeframe.errors import InstanceBusy, InvalidRequest


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeService:
    return install_fake(monkeypatch)


def assert_one_line(result: Result, code: int, *needles: str) -> None:
    assert result.code == code, (result.code, result.out, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err and "Traceback" not in result.out
    for needle in needles:
        assert needle in lines[0], lines[0]


USAGE_ERRORS = [
    (["list", "--bogus"], "No such option: --bogus"),
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
    (["snapshot"], "Missing argument 'INSTANCE'"),
    (["token", "create"], "Missing option '--role'"),
    (["list", "--status", "bogus"], "'bogus' is not one of"),
    (["--bogus"], "No such option: --bogus"),
    (["images", "nosuch"], "No such command 'nosuch'"),
    (["backup", "vm1", "--type", "daily"], "Missing option '--rotation'"),
    (["export", "s1", "--ovf-version", "3"], "--ovf-version"),
    (["restore", "s1", "extra-argument", "--as", "x"], "unexpected extra argument"),
    (["serve", "--shutdown-grace", "nan"], "--shutdown-grace"),
    (["serve", "--shutdown-grace", "inf"], "--shutdown-grace"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--workers", "many"], "--workers"),
]


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], fake: FakeService, args: list[str], message: str
) -> None:
    result = run_cli(capsys, *args)
    assert_one_line(result, 2, "freezeframe: usage error:", message, "--help")
    assert result.out == ""
    assert not fake.calls.settings, "a usage error must not reach the service"


def test_version_and_short_help(capsys: pytest.CaptureFixture[str]) -> None:
    version = run_cli(capsys, "--version")
    assert (version.code, version.out, version.err) == (0, f"freezeframe {__version__}\n", "")
    for args in (["-h"], ["--help"], ["list", "-h"], ["token", "create", "-h"], ["images", "-h"]):
        shown = run_cli(capsys, *args)
        assert shown.code == 0 and shown.err == "", args
        assert shown.out.startswith("Usage: freezeframe"), shown.out
        assert "-h, --help" in shown.out


def test_no_arguments_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys)
    assert result.code == 2 and "Usage: freezeframe" in result.err and "Traceback" not in result.err


def test_a_freezeframe_error_is_one_line_with_its_exit_code(
    capsys: pytest.CaptureFixture[str], fake: FakeService
) -> None:
    result = run_cli(capsys, "show", "nosuchset")
    assert_one_line(result, 2, "freezeframe: error: no set matches 'nosuchset'")

    def busy(*args: object, **kwargs: object) -> None:
        raise InstanceBusy("instance vm1 is busy:\nanother snapshot runs")

    fake.page_sets = busy  # type: ignore[method-assign]
    result = run_cli(capsys, "list")
    assert_one_line(result, InstanceBusy.exit_code, "instance vm1 is busy: another snapshot runs")


def test_an_unexpected_error_is_one_line_and_the_traceback_only_on_request(
    capsys: pytest.CaptureFixture[str], fake: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("surprise")

    fake.page_sets = broken  # type: ignore[method-assign]
    monkeypatch.delenv("FREEZEFRAME_DEBUG", raising=False)
    result = run_cli(capsys, "list")
    assert_one_line(result, 1, "freezeframe: internal error: KeyError", "FREEZEFRAME_DEBUG=1")
    monkeypatch.setenv("FREEZEFRAME_DEBUG", "1")
    result = run_cli(capsys, "list")
    assert result.code == 1 and "Traceback" in result.err and "KeyError" in result.err.splitlines()[-1]


def test_an_os_error_is_one_line(capsys: pytest.CaptureFixture[str], fake: FakeService) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/var/lib/freezeframe/catalog.sqlite")

    fake.page_sets = denied  # type: ignore[method-assign]
    result = run_cli(capsys, "list")
    assert_one_line(result, 1, "freezeframe: error: /var/lib/freezeframe/catalog.sqlite: Permission denied")


def test_interrupt_is_one_line_and_exit_130(capsys: pytest.CaptureFixture[str], fake: FakeService) -> None:
    from freezeframe.signals import Interrupted

    def interrupted(*args: object, **kwargs: object) -> None:
        raise Interrupted("interrupted by SIGTERM")

    fake.page_sets = interrupted  # type: ignore[method-assign]
    result = run_cli(capsys, "list")
    assert_one_line(result, 130, "freezeframe: interrupted by SIGTERM")


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "abc", "0", "301", "1e309"])
def test_freeze_cap_option_is_validated(capsys: pytest.CaptureFixture[str], fake: FakeService, value: str) -> None:
    fake.sets = [sample_set()]
    result = run_cli(capsys, "snapshot", "vm1", f"--freeze-cap={value}")
    assert_one_line(result, 3, "freezeframe: error: --freeze-cap", "watchdog" if value != "abc" else "seconds")
    assert "snapshot" not in fake.calls.args


def test_freeze_cap_option_reaches_the_service(capsys: pytest.CaptureFixture[str], fake: FakeService) -> None:
    fake.sets = [sample_set()]
    result = run_cli(capsys, "snapshot", "vm1", "--freeze-cap", "2.5", "--json")
    assert result.code == 0, result.err
    assert fake.calls.settings[-1].freeze_cap_s == 2.5


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FREEZEFRAME_FREEZE_CAP_S", "abc", "expected a number of seconds"),
        ("FREEZEFRAME_FREEZE_CAP_S", "inf", "cannot be switched off"),
        ("FREEZEFRAME_FREEZE_CAP_S", "-1", "cannot be switched off"),
        ("FREEZEFRAME_AGENT_TIMEOUT_S", "abc", "expected a whole number"),
        ("FREEZEFRAME_AGENT_TIMEOUT_S", "0", "must be between 1 and 300"),
        ("FREEZEFRAME_AGENT_TIMEOUT_S", "2.5", "expected a whole number"),
    ],
)
def test_numeric_environment_values_are_validated(
    capsys: pytest.CaptureFixture[str],
    fake: FakeService,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidRequest, match=variable):
        Settings.from_env()
    result = run_cli(capsys, "list")
    assert_one_line(result, 3, f"freezeframe: error: {variable}", message)


def test_environment_values_in_range_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEZEFRAME_FREEZE_CAP_S", "120")
    monkeypatch.setenv("FREEZEFRAME_AGENT_TIMEOUT_S", "7")
    settings = Settings.from_env()
    assert (settings.freeze_cap_s, settings.agent_timeout_s) == (120.0, 7)
    monkeypatch.setenv("FREEZEFRAME_FREEZE_CAP_S", "")
    assert Settings.from_env().freeze_cap_s == 10.0


INVALID_INPUT = [
    (["snapshot", "vm1", "--name", "bad name"], "set name 'bad name' is not usable"),
    (["snapshot", "vm1", "--name", "ok\n"], "set name 'ok\\n' is not usable"),
    (["snapshot", "vm1", "--meta", "novalue"], "--meta 'novalue': expected KEY=VALUE"),
    (["snapshot", "vm1", "--meta", "k=a\x00b"], "control character U+0000"),
    (["snapshot", "vm1", "--meta", "freezeframe.set_uuid=x"], "reserved"),
    (["snapshot", "vm1", "--meta", "bad key=v"], "metadata key 'bad key' is not usable"),
    (["list", "--meta", "k=\uffff"], "control character U+FFFF"),
    (["backup", "vm1", "--type", "da ily", "--rotation", "2"], "backup type 'da ily' is not usable"),
    (["backup", "vm1", "--type", "daily", "--rotation", "-1"], "--rotation -1: must be between 0 and 1000"),
    (["backup", "vm1", "--type", "daily", "--rotation", "two"], "--rotation 'two': expected a whole number"),
    (["backup", "vm1", "--type", "daily", "--rotation", "1", "--name", "../x"], "set name '../x' is not usable"),
    (["restore", "s1", "--as", "-rf"], "instance name '-rf' is not usable"),
    (["import", "pkg.ova", "--as", "a/b"], "instance name 'a/b' is not usable"),
    (["export", "s1", "--to-store", "--name", "x" * 64], "image name"),
    (["token", "create", "--role", "member", "--project", "a b"], "project 'a b' is not usable"),
    (["token", "create", "--role", "reader", "--description", "\x1b[2J"], "control character U+001B"),
    (["project", "assign", "vm1", "_x"], "project '_x' is not usable"),
]


@pytest.mark.parametrize(("args", "message"), INVALID_INPUT, ids=[" ".join(a)[:40] for a, _ in INVALID_INPUT])
def test_the_cli_accepts_nothing_the_api_refuses(
    capsys: pytest.CaptureFixture[str], fake: FakeService, args: list[str], message: str
) -> None:
    fake.sets = [sample_set()]
    result = run_cli(capsys, *args)
    assert_one_line(result, 3, "freezeframe: error:", message)
    assert not fake.calls.args, "invalid input must be refused before the operation runs"
    assert "\x1b" not in result.err


def test_valid_backup_input_reaches_the_lifecycle(capsys: pytest.CaptureFixture[str], fake: FakeService) -> None:
    result = run_cli(capsys, "backup", "vm1", "--type", "daily", "--rotation", "3", "--meta", "a=b", "--meta", "c=d=e")
    assert result.code == 2 and "scripted: stop here" in result.err
    instance, kind, rotation, kwargs = fake.calls.args["backup"]
    assert (instance, kind, rotation) == ("vm1", "daily", 3)
    assert kwargs["metadata"] == {"a": "b", "c": "d=e"}
    assert cli_lifecycle.ROTATION_MAX == 1000


# ---- the real entry point, in a fresh interpreter -------------------------------------------------------------


def test_entry_point_usage_error_and_version() -> None:
    done = subprocess_cli("list", "--bogus")
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and "No such option: --bogus" in done.stderr
    done = subprocess_cli("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"freezeframe {__version__}")


@pytest.mark.parametrize("kind", ["file", "proc", "under-a-file"])
def test_unusable_home_is_one_line(tmp_path: Path, kind: str) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    home = {"file": a_file, "proc": Path("/proc/freezeframe-home"), "under-a-file": a_file / "home"}[kind]
    done = subprocess_cli("list", "--home", str(home))
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("freezeframe: error:") and str(home) in done.stderr, done.stderr


def test_environment_freeze_cap_through_the_entry_point(tmp_path: Path) -> None:
    done = subprocess_cli("list", env={"FREEZEFRAME_HOME": str(tmp_path), "FREEZEFRAME_FREEZE_CAP_S": "abc"})
    assert done.returncode == 3 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "FREEZEFRAME_FREEZE_CAP_S 'abc'" in done.stderr
