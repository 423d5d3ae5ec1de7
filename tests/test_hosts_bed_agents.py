"""What the shared multi-host test bed checks before it hands its agents to the next module (``ensure_agents``):
an agent is reused only if it is alive, not stopped, and runs with the settings a start now would give it. A
plain process stands in for the agent (the check reads its /proc entries only)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from freezeframe.testbed import hosts

StartAgent = Callable[..., hosts.TestbedHost]
URL = "postgresql+psycopg://u@/ffhosts?host=/run/pg&port=5432"


@pytest.fixture
def host(tmp_path: Path) -> hosts.TestbedHost:
    (tmp_path / "agent.key").write_text("ffh_ffhost1_key\n")
    return hosts.TestbedHost("ffhost1", "qemu+unix:///system", str(tmp_path), str(tmp_path / "home"), 0, 0, None)


@pytest.fixture
def start_agent(host: hosts.TestbedHost) -> Iterator[StartAgent]:
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> hosts.TestbedHost:
        environment = hosts._child_env({**hosts.agent_env(host, URL, "ffh_ffhost1_key"), **env})
        started.append(subprocess.Popen(["sleep", "60"], env=environment))
        return hosts.TestbedHost(**{**host.__dict__, "agent_pid": started[-1].pid})

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_an_agent_started_with_the_current_settings_is_kept(
    start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FREEZEFRAME_FREEZE_CAP_S", "4")
    assert hosts._runs_as_started_now(start_agent(), URL)


def test_other_settings_a_stopped_or_a_dead_agent_are_restarted(
    start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FREEZEFRAME_FREEZE_CAP_S", "4")
    capped = start_agent()
    monkeypatch.delenv("FREEZEFRAME_FREEZE_CAP_S")
    assert not hosts._runs_as_started_now(capped, URL)  # the previous module's freeze cap
    assert not hosts._runs_as_started_now(start_agent(FREEZEFRAME_FAULT_HOLD_IN_WINDOW_S="30"), URL)
    stopped = start_agent()
    os.kill(int(stopped.agent_pid or 0), signal.SIGSTOP)
    assert not hosts._runs_as_started_now(stopped, URL)
    dead = start_agent()
    hosts.stop_pid(dead.agent_pid, sig=signal.SIGKILL)
    assert not hosts._runs_as_started_now(dead, URL)
    assert hosts._runs_as_started_now(start_agent(), URL)
