"""Multi-slice meshes: the launchers' generated commands and manifests, the DCN transfers counted in a compiled
multi-slice program, the hybrid mesh refused where the devices do not come from that many slices, and (slow)
the TPU compiler's multi-slice plan."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import jax
import pytest
import yaml

from qkv.errors import UserError
from qkv.launch.multislice import jobset_manifest, main as multislice_main, tpu_vm_commands
from qkv.tools.topology_plan import collective_stats
from qkv.train.config import MeshConfig
from qkv.train.sharding import make_mesh

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def test_jobset_runs_one_job_per_slice_and_joins_them(capsys):
    assert multislice_main(["gke", "--name", "qkv-70b", "--slices", "2", "--accelerator", "tpu-v5p-slice",
                            "--topology", "4x4x4", "--image", "img", "--bucket", "b", "--", "llama-70b",
                            "mesh.fsdp=64"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    job = doc["spec"]["replicatedJobs"][0]
    assert doc["kind"] == "JobSet" and job["replicas"] == 2
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 16  # 64 chips / 4 per host
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["qkv", "pretrain", "llama-70b", "mesh.fsdp=64", "mesh.dcn_data=2"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x4"
    env = {e["name"]: e for e in container["env"]}
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"].startswith("qkv-70b-slice-0-0.qkv-70b:")
    assert "jobset.sigs.k8s.io/job-index" in env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert doc["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"]
    # a command that chooses its own DCN axes keeps them
    own = jobset_manifest("j", 4, "a", "2x2x2", 2, 4, "i", "b", ["tiny", "mesh.dcn_fsdp=4"])
    assert own["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"][-1] == \
        "mesh.dcn_fsdp=4"


def test_tpu_vm_commands_queue_several_slices_and_run_on_all():
    create, run = tpu_vm_commands("qkv", 2, "v5p-128", "us-east5-a", ["llama-70b", "mesh.fsdp=64"])
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-count=2" in create and "--node-prefix=qkv" in create and "--accelerator-type=v5p-128" in create
    assert "--node=all" in run and "--worker=all" in run
    remote = next(a for a in run if a.startswith("--command="))
    assert shlex.split(remote.split("&& ", 1)[1])[1:] == ["pretrain", "llama-70b", "mesh.fsdp=64", "mesh.dcn_data=2"]


def test_tpu_vm_script_knows_slices():
    bash = shutil.which("bash")
    assert bash
    assert subprocess.run([bash, "-n", str(LAUNCH / "tpu_vm.sh")]).returncode == 0
    text = (LAUNCH / "tpu_vm.sh").read_text()
    for needle in ('--node-count="$SLICES"', '--node-prefix="$NAME"', "--node=all", "mesh.dcn_data=$SLICES"):
        assert needle in text, needle


# The shape of a multi-slice TPU program's DCN transfer (as libtpu 0.0.42 writes it): a send to the Megascale
# runtime tagged with its collective, inside a loop body run 3 times, beside an ordinary in-slice all-reduce.
HLO = """HloModule jit_train_step, num_partitions=4

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %send = (f32[8,128]{1,0}, u32[], token[]) send(%x, %after-all), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[8,128]{1,0}, u32[], token[]) recv(%after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %all-reduce = f32[8,128]{1,0} all-reduce(%y), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
}

%cond (p: (s32[], f32[8,128])) -> pred[] {
  %c = s32[] constant(3)
}

ENTRY %main (a: f32[8,128]) -> f32[8,128] {
  %while = (s32[], f32[8,128]) while(%t), condition=%cond, body=%body
  %send.1 = (bf16[64]{0}, u32[], token[]) send(%z, %after-all), channel_id=9, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}
}
"""


def test_dcn_transfers_are_counted_apart_from_in_slice_collectives():
    stats = collective_stats(HLO)
    assert stats["all-reduce"] == {"count": 3, "bytes": 3 * 8 * 128 * 4}
    assert stats["dcn all-reduce"] == {"count": 3, "bytes": 3 * 8 * 128 * 4}  # sends only, not the recvs
    assert stats["dcn all-gather"] == {"count": 1, "bytes": 64 * 2}


def test_hybrid_mesh_needs_devices_from_that_many_slices():
    with pytest.raises(UserError, match="mesh.dcn_data=2"):
        make_mesh(MeshConfig(data=4, dcn_data=2), jax.devices()[:8])  # CPU devices are one slice


@pytest.mark.slow
def test_plan_compiles_two_slices_and_reports_the_dcn_traffic(capsys):
    pytest.importorskip("libtpu")
    from qkv.cli import main
    code = main(["plan", "tiny", "model.n_layers=1", "train.batch_size=8", "data.seq_len=128", "--topology", "v5p:2x2x1",
                 "--slices", "2", "--mesh", "fsdp=4", "--json"])
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and plan["chips"] == 8 and plan["slices"] == 2 and plan["dcn"] == {"data": 2, "fsdp": 1}
    assert plan["rows_per_chip"] == 1
    # data parallelism across the slices: the gradients are all-reduced over the DCN, the fsdp traffic stays inside
    assert plan["collectives"]["dcn all-reduce"]["bytes"] > 0 and plan["collectives"]["all-gather"]["count"] > 0
