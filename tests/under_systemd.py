"""`make test-systemd`: the unit under a real systemd, installed from this source tree as the README says.

It boots a Debian 12 container whose PID 1 is systemd 252 (with the shared `systemd-container` tool),
copies the source tree in, installs it by running the README's own install commands (offline, from a
wheelhouse, with every index unreachable), runs the simulator and the fake DingTalk there on 127.0.0.1,
then checks what only a real systemd shows. One line per check; the exit status is 1 when any failed.

Not part of `make test`: it needs root and apt, and takes a few minutes (the container's root file
system is cached in --dir between runs). Ports 24370-24372 and 24380 are used by nothing else.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "/root/zkdingsync"  # the source tree inside the container
CONFIG = "/etc/zkdingsync/config.yaml"
SECRET = "systemd-check-secret-4242"
APP_KEY = "dingsystemdcheck"
TERMINAL_PORTS = (24370, 24371)
DOWN_PORT = 24372  # a configured terminal with nothing listening: always down
DINGTALK_PORT = 24380
USERS = {"1001": "alice", "1002": "bob"}  # 1003 is added by the reload check
NOWHERE = "http://127.0.0.1:9"  # the proxy and index of the offline install: nothing listens there
PUNCH_EVERY_SECONDS = 7
WATCHDOG_WINDOW_SECONDS = 125  # WatchdogSec=60: two periods and a little
LONG_INTERVAL_SECONDS = 40  # the first config's poll interval; the reload check makes it 2 s


class CheckFailed(Exception):
    """One check's failure, in one line."""


class Container:
    """The booted container: `sh` runs a bash script inside it as root."""

    def __init__(self, tool: Path, directory: Path) -> None:
        self.tool = tool
        self.directory = directory

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.directory / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def _clear_stale(self) -> None:
        """A container powered off by an earlier run can leave systemd-nspawn halting for a minute or more
        after its PID 1 is gone; the boot tool would then take it for a running container (and enter a
        dead leader). Wait for such an nspawn to end, then drop its pid files."""
        leader = self._pid("leader.pid")
        if leader is None or Path(f"/proc/{leader}/ns").exists():
            return
        nspawn = self._pid("nspawn.pid")
        if nspawn is not None:
            wait_for(lambda: not Path(f"/proc/{nspawn}").exists(), 180, "the earlier container's nspawn ends")
        for name in ("leader.pid", "nspawn.pid"):
            (self.directory / name).unlink(missing_ok=True)

    def boot(self) -> str:
        self._clear_stale()
        done = subprocess.run(
            [str(self.tool / "boot"), str(self.directory)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise CheckFailed(f"boot failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return self.sh("systemctl --version | head -1").strip()

    def stop(self) -> None:
        subprocess.run([str(self.tool / "stop"), str(self.directory)], capture_output=True, check=False)

    def run(
        self, script: str, *, stdin: str | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.tool / "run"), str(self.directory), script],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def sh(self, script: str, *, stdin: str | None = None, timeout: float = 600) -> str:
        """Run `script`; return its stdout. Raise CheckFailed when it exits non-zero."""
        done = self.run(script, stdin=stdin, timeout=timeout)
        if done.returncode != 0:
            output = (done.stderr.strip() or done.stdout.strip())[-800:]
            raise CheckFailed(f"`{script.splitlines()[0][:80]}` exited {done.returncode}: {output}")
        return done.stdout

    def write(self, path: str, text: str) -> None:
        self.sh(f"cat > {shlex.quote(path)}", stdin=text)

    def unit(self, *properties: str) -> dict[str, str]:
        shown = self.sh(f"systemctl show zkdingsync -p {','.join(properties)}")
        return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)

    def now(self) -> str:
        """The time now, as journalctl --since takes it. (Not a cursor: journalctl 252 with --after-cursor
        and a match such as -p drops the first matching entry after the cursor.)"""
        return "@" + self.sh("date +%s.%N").strip()

    def journal(self, since: str, *options: str) -> str:
        """`journalctl -u zkdingsync` messages since `since` (all when empty), with `options` (-p warning)."""
        after = f"--since={since}" if since else ""
        return self.sh(f"journalctl -q -u zkdingsync --no-pager -o cat {after} {' '.join(options)}")


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Return the first true value of `condition()` within `timeout` seconds; raise CheckFailed."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            value = condition()
            if value:
                return value
        except CheckFailed as error:
            last_error = f" ({error})"
        if time.monotonic() >= deadline:
            raise CheckFailed(f"{what}: not within {timeout:g} s{last_error}")
        time.sleep(interval)


def config_text(users: dict[str, str], *, broken: bool = False, interval: int = 2) -> str:
    """The test's config (what `editor` makes of the sample): the fakes, the secret as a credential."""
    mapped = "".join(f'    "{number}": {userid}\n' for number, userid in users.items())
    devices = "".join(
        f"  - name: {name}\n    host: 127.0.0.1\n    {'prot' if broken else 'port'}: {port}\n"
        for name, port in [("lobby", TERMINAL_PORTS[0]), ("gate", TERMINAL_PORTS[1]), ("attic", DOWN_PORT)]
    )
    return (
        f"dingtalk:\n  app_key: {APP_KEY}\n  api_base: http://127.0.0.1:{DINGTALK_PORT}\n"
        "  readback_delay_seconds: 2\n"
        f"poll:\n  interval_seconds: {interval}\n  timeout_seconds: 2\n  backoff_max_seconds: 10\n"
        f"users:\n  map:\n{mapped}devices:\n{devices}"
    )


def uploads() -> list[dict[str, Any]]:
    """What the fake DingTalk (in the container, on this machine's loopback) has accepted."""
    url = f"http://127.0.0.1:{DINGTALK_PORT}/_fake/uploads"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return list(json.load(answer)["uploads"])
    except OSError as error:
        raise CheckFailed(f"the fake DingTalk does not answer: {error}") from error


def readme_install_commands() -> list[str]:
    """The commands of the README's "Install on a real box" block, in order."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Install on a real box", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [
        line.split("  #")[0].strip()
        for line in block.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def readme_offline_install() -> str:
    """The README's pip line for a box without PyPI access."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### A box without PyPI access", 1)[1]
    return next(line.strip() for line in section.splitlines() if "--no-index" in line)


class Run:
    """The checks, in order; each prints one line."""

    def __init__(self, box: Container) -> None:
        self.box = box
        self.failed = 0
        self.since = ""  # journal time when this run began (the root fs keeps older runs' logs)
        self.started_at = 0.0
        self.first_pid = ""

    def check(self, name: str, action: Callable[[], str], *, needed: bool = False) -> bool:
        try:
            detail = action()
        except CheckFailed as error:
            self.failed += 1
            print(f"FAIL {name}: {error}", flush=True)
            if needed:
                raise
            return False
        print(f"ok   {name}: {detail}", flush=True)
        return True

    # --- set-up

    def reset(self) -> str:
        """Undo an earlier run in the cached root file system."""
        self.box.sh(
            "systemctl stop zkdingsync zkdingsync-backup.timer zkds-simulator zkds-dingtalk 2>/dev/null; "
            "systemctl disable zkdingsync zkdingsync-backup.timer 2>/dev/null; "
            "systemctl reset-failed 2>/dev/null; "
            "rm -rf /opt/zkdingsync /etc/zkdingsync /var/lib/zkdingsync /usr/local/bin/zkdingsync "
            f"/etc/systemd/system/zkdingsync.service /etc/systemd/system/zkdingsync-backup.* {SOURCE}; "
            "id zkdingsync >/dev/null 2>&1 && userdel zkdingsync; systemctl daemon-reload; "
            "command -v make >/dev/null || (apt-get update -qq && apt-get install -y -qq make >/dev/null)"
        )
        self.since = self.box.now()
        files = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        target = self.box.directory / "root" / SOURCE.lstrip("/")
        names = [name for name in files.decode().split("\0") if name and (ROOT / name).is_file()]
        for name in names:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
        return f"{len(names)} files of the source tree copied to {SOURCE}"

    def install(self) -> str:
        """The README's install block, command by command, with the offline pip line and the test's
        config in place of the editor."""
        self.box.sh(f"cd {SOURCE} && make wheelhouse >/dev/null", timeout=900)
        offline = f"env https_proxy={NOWHERE} http_proxy={NOWHERE} PIP_INDEX_URL={NOWHERE}/simple "
        done = []
        for command in readme_install_commands():
            if command.startswith("cd "):
                continue
            stdin = None
            if command.endswith("pip install ."):
                before = self.box.sh(f"cd {SOURCE} && find . -path ./wheelhouse -prune -o -print | sort")
                self.box.sh(f"cd {SOURCE} && {offline}{readme_offline_install()}", timeout=900)
                after = self.box.sh(f"cd {SOURCE} && find . -path ./wheelhouse -prune -o -print | sort")
                left = sorted(set(after.split()) - set(before.split()))
                if left:
                    raise CheckFailed(f"pip install left {', '.join(left[:5])} in the source tree")
                done.append("offline pip install (tree clean)")
                continue
            if command.startswith("ln -s "):
                self.start_fakes()  # probe --users and the daemon need them; they run from the install
            if command.startswith("editor "):
                # A long interval to begin with: the reload check shortens it.
                self.box.write(CONFIG, config_text(USERS, interval=LONG_INTERVAL_SECONDS))
                continue
            if command.startswith("journalctl") and "-f" in command.split():
                continue
            if "/dev/stdin" in command:
                stdin = SECRET + "\n"
            if command.startswith("systemctl enable --now"):
                self.started_at = time.monotonic()
            if command.startswith("zkdingsync status"):
                continue  # checked below, once the daemon has polled
            if command.startswith("zkdingsync probe"):
                # attic is down on purpose: probe says so and exits 1; the two simulated ones answer.
                probe = self.box.run(f"cd {SOURCE} && {command}").stdout
                if "2 of 3 terminals answered" not in probe:
                    raise CheckFailed(f"{command}: {probe.strip()[-300:]}")
                done.append("probe")
                continue
            self.box.sh(f"cd {SOURCE} && {command}", stdin=stdin)
            done.append(command.split()[0] if not command.startswith("/") else command.split()[1])
        return f"{len(done)} README steps ran, pip with --no-index and every index unreachable"

    def start_fakes(self) -> None:
        """The simulator and the fake DingTalk, as transient units in the container, on 127.0.0.1."""
        spec = "".join(
            f"- name: {name}\n  port: {port}\n  users: 3\n  records: 4\n"
            f"  punch_interval: {PUNCH_EVERY_SECONDS}\n"
            for name, port in zip(("lobby", "gate"), TERMINAL_PORTS, strict=True)
        )
        self.box.write("/root/simulator.yaml", spec)
        self.box.write("/root/dingtalk-users.json", json.dumps(["alice", "bob", "carol"]))
        self.box.sh(
            "systemd-run -q --unit zkds-simulator /opt/zkdingsync/bin/zkdingsync simulate --spec "
            "/root/simulator.yaml && systemd-run -q --unit zkds-dingtalk /opt/zkdingsync/bin/python -m "
            f"zkdingsync.dingtalk.fake --port {DINGTALK_PORT} --app-key {APP_KEY} --app-secret {SECRET} "
            "--users-file /root/dingtalk-users.json"
        )
        wait_for(
            lambda: self.box.run(f"exec 3<>/dev/tcp/127.0.0.1/{DINGTALK_PORT}").returncode == 0, 20, "fakes"
        )

    # --- the checks

    def start(self) -> str:
        state = self.box.unit("ActiveState", "SubState", "MainPID", "StatusText")
        if (state["ActiveState"], state["SubState"]) != ("active", "running"):
            raise CheckFailed(f"{state['ActiveState']}/{state['SubState']}")
        self.first_pid = state["MainPID"]
        ready = self.box.journal(self.since)
        if "daemon.started" not in ready:
            raise CheckFailed("no daemon.started in the journal")
        wait_for(lambda: {u["userid"] for u in uploads()} >= {"alice", "bob"}, 60, "first deliveries")
        return f"active (running) after READY=1, pid {self.first_pid}, punches delivered"

    def status_and_warnings(self) -> str:
        status = wait_for(
            lambda: (
                self.box.unit("StatusText")["StatusText"].startswith("1 terminal down: attic")
                and self.box.unit("StatusText")["StatusText"]
            ),
            30,
            "STATUS= naming the down terminal first",
        )
        warnings = self.box.journal(self.since, "-p", "warning")
        if "terminal.down" not in warnings or "device=attic" not in warnings:
            raise CheckFailed("terminal.down device=attic is not in journalctl -p warning")
        return f"STATUS={status!r}; terminal.down in journalctl -p warning"

    def reload_interval(self) -> str:
        """Right after a poll of lobby (a new upload from it), shorten poll.interval_seconds from 40 s to 2 s:
        lobby's next punch must then arrive long before the 40 s wait that was running would have ended."""
        lobby = f"SIM{TERMINAL_PORTS[0]}"

        def from_lobby() -> int:
            return sum(1 for upload in uploads() if upload["device_id"] == lobby)

        count = from_lobby()
        wait_for(lambda: from_lobby() > count, LONG_INTERVAL_SECONDS + 20, "a poll of lobby at 40 s")
        polled_at = time.monotonic()
        self.box.write(CONFIG, config_text(USERS))
        self.box.sh("systemctl reload zkdingsync")
        count = from_lobby()
        # lobby punches every 7 s and is polled every 2 s now; at 40 s its next poll would be much later.
        wait_for(lambda: from_lobby() > count, 14, "lobby's next punch at the new interval")
        took = time.monotonic() - polled_at
        return f"reload exit 0; lobby's next punch {took:.0f} s after its poll, not {LONG_INTERVAL_SECONDS}"

    def reload_map(self) -> str:
        self.box.write(CONFIG, config_text({**USERS, "1003": "carol"}))
        since = self.box.now()
        done = self.box.run("systemctl reload zkdingsync")
        if done.returncode != 0:
            raise CheckFailed(f"systemctl reload exited {done.returncode}: {done.stderr.strip()}")
        if "config.reloaded" not in self.box.journal(since):
            raise CheckFailed("no config.reloaded logged when systemctl reload returned")
        self.box.sh("zkdingsync retry")  # the README: after adding a mapping
        wait_for(lambda: any(u["userid"] == "carol" for u in uploads()), 60, "punches of 1003 as carol")
        return "systemctl reload exit 0, then retry: 1003's punches reached DingTalk as carol"

    def reload_broken(self) -> str:
        pid = self.box.unit("MainPID")["MainPID"]
        good = config_text({**USERS, "1003": "carol"})
        self.box.write(CONFIG, config_text({**USERS, "1003": "carol"}, broken=True))
        since = self.box.now()
        done = self.box.run("systemctl reload zkdingsync")
        try:
            if done.returncode == 0:
                raise CheckFailed("systemctl reload succeeded on a broken file")
            state = self.box.unit("ActiveState", "MainPID")
            if state != {"ActiveState": "active", "MainPID": pid}:
                raise CheckFailed(f"the daemon did not keep running: {state}")
            warnings = self.box.journal(since, "-p", "warning")
            if "config.reload_rejected" not in warnings or "prot" not in warnings:
                raise CheckFailed(f"journalctl -p warning does not say why: {warnings.strip()[-300:]}")
            count = len(uploads())
            wait_for(lambda: len(uploads()) > count, 60, "a delivery under the old configuration")
        finally:
            self.box.write(CONFIG, good)
        return (
            f"systemctl reload exit {done.returncode}, same pid, config.reload_rejected at warning, "
            "the old config still delivering"
        )

    def watchdog(self) -> str:
        left = self.started_at + WATCHDOG_WINDOW_SECONDS - time.monotonic()
        if left > 0:
            time.sleep(left)
        state = self.box.unit("MainPID", "NRestarts", "ActiveState")
        if state["MainPID"] != self.first_pid or state["NRestarts"] != "0":
            raise CheckFailed(f"restarted: {state}")
        if "Watchdog timeout" in self.box.journal(self.since):
            raise CheckFailed("systemd logged a watchdog timeout")
        return f"same pid {self.first_pid} after {WATCHDOG_WINDOW_SECONDS} s, no restart (WatchdogSec=60)"

    def kill9(self) -> str:
        pid = self.box.unit("MainPID")["MainPID"]
        self.box.sh(f"kill -9 {pid}")
        new = wait_for(
            lambda: (
                (s := self.box.unit("MainPID", "SubState"))["SubState"] == "running"
                and s["MainPID"] not in {pid, "0"}
                and s["MainPID"]
            ),
            30,
            "restart after kill -9",
        )
        verdict = wait_for(self.exactly_once, 90, "every punch delivered exactly once", interval=2)
        return f"pid {pid} killed, restarted as {new}; {verdict}"

    def exactly_once(self) -> str | None:
        """Once the terminals, the store and DingTalk agree: every punch stored, each delivered once."""
        probe = self.box.run("zkdingsync probe lobby gate").stdout
        on_terminals = sum(int(n) for n in re.findall(r"records:\s+(\d+) /", probe))
        status = json.loads(self.box.run("zkdingsync status --json").stdout)
        delivery = status["delivery"]
        states = ("pending", "in_flight", "delivered_total", "parked", "quarantined", "history")
        stored = sum(int(delivery.get(state) or 0) for state in states)
        accepted = uploads()
        keys = Counter((u["userid"], u["user_check_time"], u["device_id"]) for u in accepted)
        duplicated = [key for key, n in keys.items() if n > 1]
        if duplicated:
            raise CheckFailed(f"uploaded twice: {duplicated[:3]}")
        if stored != on_terminals or delivery["pending"] or delivery["in_flight"]:
            return None
        if delivery["delivered_total"] != len(accepted):
            return None
        return (
            f"{on_terminals} punches on the terminals, {stored} stored, {len(accepted)} uploads, no duplicate"
        )

    def stop(self) -> str:
        since = self.box.now()
        self.box.sh("systemctl stop zkdingsync", timeout=60)
        state = self.box.unit("ActiveState", "Result", "ExecMainStatus")
        if state != {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}:
            raise CheckFailed(str(state))
        if "daemon.stopped" not in self.box.journal(since):
            raise CheckFailed("no daemon.stopped in the journal")
        return "inactive, exit 0, daemon.stopped logged"

    def _failed_for_good(self, status: str) -> None:
        """Wait until systemd has settled the unit as failed with `status` and no restart pending.

        A unit that will be restarted sits in SubState auto-restart (ActiveState activating) for
        RestartSec; SubState failed means systemd decided against a restart, so no sleep is needed."""
        wanted = {"ActiveState": "failed", "SubState": "failed", "ExecMainStatus": status, "NRestarts": "0"}

        def settled() -> bool:
            state = self.box.unit(*wanted)
            if state != wanted:
                raise CheckFailed(str(state))
            return True

        wait_for(settled, 30, f"failed with {status}, no restart", interval=0.5)

    def invalid_config(self) -> str:
        good = self.box.sh(f"cat {CONFIG}")
        self.box.write(CONFIG, good.split("devices:")[0] + "devices: []\n")
        since = self.box.now()
        try:
            self.box.run("systemctl start zkdingsync")
            self._failed_for_good("78")
            warnings = self.box.journal(since, "-p", "warning")
            if "devices: must list at least 1 entry" not in warnings:
                raise CheckFailed(f"journalctl -p warning does not say why: {warnings.strip()[-300:]}")
        finally:
            self.box.write(CONFIG, good)
        return "failed with 78, no restart, the problem line in journalctl -p warning"

    def missing_credential(self) -> str:
        self.box.sh(
            "mv /etc/zkdingsync/app_secret /root/app_secret.kept && systemctl reset-failed zkdingsync"
        )
        since = self.box.now()
        try:
            self.box.run("systemctl start zkdingsync")
            self._failed_for_good("243")
            said = self.box.sh(f"journalctl -q --no-pager -o cat --since={since}")
            if "Failed to set up credentials" not in said:
                raise CheckFailed(f"no 'Failed to set up credentials' in the journal: {said.strip()[-300:]}")
            shown = self.box.run("systemctl status zkdingsync").stdout
            if "243/CREDENTIALS" not in shown:
                raise CheckFailed("systemctl status does not show 243/CREDENTIALS")
        finally:
            self.box.sh("mv /root/app_secret.kept /etc/zkdingsync/app_secret")
        # The README's fix: the file back, then a restart.
        self.box.sh("systemctl restart zkdingsync")
        wait_for(lambda: self.box.unit("ActiveState")["ActiveState"] == "active", 30, "active again")
        return (
            "243/CREDENTIALS, 'Failed to set up credentials', no restart loop; restart after the fix: active"
        )

    def clean_up(self) -> None:
        self.box.run("systemctl stop zkdingsync zkdingsync-backup.timer zkds-simulator zkds-dingtalk")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tool", type=Path, required=True, help="the systemd-container tool's directory")
    parser.add_argument("--dir", type=Path, required=True, help="where the container's root fs is cached")
    parser.add_argument("--keep", action="store_true", help="leave the container running afterwards")
    args = parser.parse_args(argv)
    box = Container(args.tool.resolve(), args.dir)
    run = Run(box)
    try:
        run.check("boot", box.boot, needed=True)
        run.check("copy", run.reset, needed=True)
        run.check("install as the README says", run.install, needed=True)
        run.check("start reaches active after READY", run.start, needed=True)
        run.check("STATUS= and journalctl -p warning", run.status_and_warnings)
        run.check("reload: a shorter poll interval applies from the next poll", run.reload_interval)
        run.check("reload with a changed map applies it", run.reload_map)
        run.check("reload with a broken file keeps the old config", run.reload_broken)
        run.check("watchdog quiet for two minutes", run.watchdog)
        run.check("kill -9: restart, nothing lost, no duplicate", run.kill9)
        run.check("stop exits clean", run.stop)
        run.check("invalid config: exit 78, no restart", run.invalid_config)
        run.check("missing credential as the README says", run.missing_credential)
    except CheckFailed:
        print("stopped: a later check needs this one", flush=True)
    finally:
        run.clean_up()
        if not args.keep:
            box.stop()
    print(f"{'FAILED' if run.failed else 'passed'}: {run.failed} check(s) failed", flush=True)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
