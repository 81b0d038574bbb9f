"""Launchers: the shell scripts parse (bash -n), the JobSet templates are valid YAML of the right shape."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qkv.launch.local import process_env

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
    bash = shutil.which("bash")
    assert bash, "bash is needed for this test"
    out = subprocess.run([bash, "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (LAUNCH / script).read_text()
    assert "qkv" in text and "pretrain" in text and text.startswith("#!")


def test_slurm_script_sets_the_coordinator_and_requeues():
    text = (LAUNCH / "slurm.sbatch").read_text()
    for needle in ("JAX_COORDINATOR_ADDRESS=", "JAX_NUM_PROCESSES=", "JAX_PROCESS_ID=$SLURM_PROCID",
                   "#SBATCH --requeue", "scontrol requeue"):
        assert needle in text, needle


def test_tpu_script_runs_on_every_worker_and_restarts():
    text = (LAUNCH / "tpu_vm.sh").read_text()
    for needle in ("--worker=all", "queued-resources create", "--spot", "MAX_RESTARTS", "train.run_dir=$MOUNT"):
        assert needle in text, needle


def test_jobset_templates_parse_and_wire_the_processes():
    docs = [d for d in yaml.safe_load_all((LAUNCH / "gke" / "jobset.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["JobSet", "JobSet"]
    for doc in docs:
        job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
        pod = job["template"]["spec"]
        container = pod["containers"][0]
        assert container["command"][:2] == ["qkv", "pretrain"]
        assert doc["spec"]["failurePolicy"]["maxRestarts"] > 0 and job["parallelism"] == job["completions"]
        assert any(v["mountPath"] == "/gcs" for v in container["volumeMounts"])
    gpu_env = {e["name"]: e for e in docs[1]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
               ["containers"][0]["env"]}
    assert gpu_env["JAX_COORDINATOR_ADDRESS"]["value"].startswith("qkv-gpu-workers-0-0.qkv-gpu:")
    assert "job-completion-index" in gpu_env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert gpu_env["JAX_NUM_PROCESSES"]["value"] == str(docs[1]["spec"]["replicatedJobs"][0]["template"]["spec"]
                                                        ["parallelism"])


def test_local_launcher_environment():
    env = process_env(1, 4, 2, 5555, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:5555" and env["JAX_NUM_PROCESSES"] == "4"
    assert env["JAX_PROCESS_ID"] == "1" and env["JAX_PLATFORMS"] == "cpu" and env["JAX_NUM_CPU_DEVICES"] == "2"
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_launcher_starts_processes_reaches_every_process(tmp_path, monkeypatch, sig):
    """The launcher's signal lands right after it started process 1, before its bookkeeping of that process
    is done (the moment is made exact: the Popen of process 1 waits until the child has installed its
    handlers, then signals the launcher). Every process must still get the signal: none is left running."""
    import signal
    import subprocess
    import time

    from qkv.launch import local

    fake = tmp_path / "fake-python"  # records the signal it gets in a file, like qkv pretrain stops on one
    fake.write_text(f"#!{sys.executable}\nimport os, signal, sys, time\n"
                    f"out = {str(tmp_path)!r} + '/proc-' + os.environ['JAX_PROCESS_ID']\n"
                    "def stop(signum, frame):\n"
                    "    open(out + '.got', 'w').write(signal.Signals(signum).name)\n"
                    "    sys.exit(75)\n"
                    "signal.signal(signal.SIGINT, stop)\nsignal.signal(signal.SIGTERM, stop)\n"
                    "open(out + '.ready', 'w').close()\ntime.sleep(120)\n")
    fake.chmod(0o755)
    started, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        p = real_popen(*args, **kwargs)
        started.append(p)
        i = kwargs["env"]["JAX_PROCESS_ID"]
        deadline = time.monotonic() + 60
        while not (tmp_path / f"proc-{i}.ready").exists() and time.monotonic() < deadline:  # the child's handshake
            time.sleep(0.01)
        if i == "1":
            os.kill(os.getpid(), getattr(signal, sig))
        return p

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    try:
        code = local.launch_local(["pretrain"], 2, python=str(fake), grace_s=30)
    finally:
        alive = [p for p in started if p.poll() is None]
        for p in alive:
            p.kill()
            p.wait()
    assert len(started) == 2 and not alive, "a process was left running"
    assert code == 128 + getattr(signal, sig)
    assert [(tmp_path / f"proc-{i}.got").read_text() for i in range(2)] == [sig, sig]
