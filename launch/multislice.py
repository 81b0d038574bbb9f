"""Multi-slice TPU jobs: several TPU slices joined over the data-center network (DCN), one ``qkv pretrain``.

    python -m qkv.launch.multislice gke --name qkv-70b --slices 2 --accelerator tpu-v5p-slice --topology 4x4x4 \
        --image REGION-docker.pkg.dev/PROJECT/REPO/qkv:tpu --bucket BUCKET -- llama-70b mesh.fsdp=64
    python -m qkv.launch.multislice tpu-vm --name qkv-70b --slices 2 --accelerator v5p-128 --zone us-east5-a \
        -- llama-70b mesh.fsdp=64

Both add ``mesh.dcn_data=<slices>`` (unless the command sets ``mesh.dcn_data`` / ``mesh.dcn_fsdp`` itself), so
the data axis spans the slices and every other axis stays inside one (train/sharding.py ``make_mesh``).

- ``gke``: a JobSet manifest (YAML on stdout) with one replicated job per slice (``replicas: slices``), one pod
  per host, every pod given the variables the TPU runtime reads to join the slices (``MEGASCALE_COORDINATOR_ADDRESS``:
  the first pod of the first slice, ``MEGASCALE_NUM_SLICES``, ``MEGASCALE_SLICE_ID``: the job index JobSet
  annotates). ``kubectl apply -f -`` it.
- ``tpu-vm``: the gcloud commands (one per line on stdout) for a queued resource of ``slices`` nodes
  (``--node-count``, ``--node-prefix``) and the same command on every worker of every node
  (``queued-resources ssh --node=all --worker=all``); the TPU VM runtime sets the multi-slice variables itself.
  ``launch/tpu_vm.sh`` with ``SLICES=N QUEUED=1`` runs these with install, restart and resume.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Sequence

import yaml

COORDINATOR_PORT = 8080


def with_dcn(command: Sequence[str], slices: int) -> list[str]:
    """``command`` (a qkv pretrain argument list) with the data axis spanning ``slices`` slices."""
    command = list(command)
    if slices > 1 and not any(a.startswith(("mesh.dcn_data=", "mesh.dcn_fsdp=")) for a in command):
        command.append(f"mesh.dcn_data={slices}")
    return command


def jobset_manifest(name: str, slices: int, accelerator: str, topology: str, hosts: int, chips_per_host: int,
                    image: str, bucket: str, args: Sequence[str], service_account: str = "<ksa-with-bucket-access>",
                    max_restarts: int = 20) -> dict[str, Any]:
    """A JobSet of ``slices`` TPU slices (``hosts`` pods of ``chips_per_host`` chips each) running qkv pretrain."""
    run = ["qkv", "pretrain", *with_dcn(args, slices)]
    env = [
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}:{COORDINATOR_PORT}"},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
        {"name": "MEGASCALE_SLICE_ID",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
    ]
    pod = {
        "serviceAccountName": service_account,
        "restartPolicy": "Never",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": accelerator,
                         "cloud.google.com/gke-tpu-topology": topology},
        "containers": [{
            "name": "qkv", "image": image, "command": run, "env": env,
            "ports": [{"containerPort": COORDINATOR_PORT}],
            "resources": {"limits": {"google.com/tpu": chips_per_host}},
            "volumeMounts": [{"name": "gcs", "mountPath": "/gcs"}],
        }],
        "volumes": [{"name": "gcs", "csi": {"driver": "gcsfuse.csi.storage.gke.io",
                                            "volumeAttributes": {"bucketName": bucket, "mountOptions": "implicit-dirs"}}}],
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": slices,  # one Job per slice; exclusive-topology puts each on its own node pool
                "template": {"spec": {
                    "parallelism": hosts, "completions": hosts, "backoffLimit": 0, "completionMode": "Indexed",
                    "template": {"metadata": {"annotations": {"gke-gcsfuse/volumes": "true"}}, "spec": pod},
                }},
            }],
        },
    }


def tpu_vm_commands(name: str, slices: int, accelerator: str, zone: str, args: Sequence[str],
                    runtime_version: str = "v2-alpha-tpuv5", spot: bool = False, venv: str = "~/venv") -> list[list[str]]:
    """gcloud argument lists: create a queued resource of ``slices`` slices, then run qkv pretrain on all of them."""
    create = ["gcloud", "compute", "tpus", "queued-resources", "create", f"{name}-qr", f"--zone={zone}",
              f"--accelerator-type={accelerator}", f"--runtime-version={runtime_version}",
              f"--node-count={slices}", f"--node-prefix={name}", *(["--spot"] if spot else [])]
    pretrain = " ".join(shlex.quote(a) for a in [f"{venv}/bin/qkv", "pretrain", *with_dcn(args, slices)])
    run = ["gcloud", "compute", "tpus", "queued-resources", "ssh", f"{name}-qr", f"--zone={zone}", "--node=all",
           "--worker=all", f"--command=cd ~ && {pretrain}"]
    return [create, run]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkv.launch.multislice", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="target", required=True)
    for target in ("gke", "tpu-vm"):
        p = sub.add_parser(target)
        p.add_argument("--name", required=True)
        p.add_argument("--slices", type=int, required=True)
        p.add_argument("--accelerator", required=True, help="gke: e.g. tpu-v5p-slice; tpu-vm: e.g. v5p-128")
        p.add_argument("args", nargs=argparse.REMAINDER, help="-- CONFIG [section.key=value ...]")
        if target == "gke":
            p.add_argument("--topology", required=True, help="one slice's chip topology, e.g. 4x4x4")
            p.add_argument("--hosts", type=int, default=0, help="hosts per slice (default: chips / 4)")
            p.add_argument("--chips-per-host", type=int, default=4)
            p.add_argument("--image", required=True)
            p.add_argument("--bucket", required=True)
        else:
            p.add_argument("--zone", required=True)
            p.add_argument("--runtime-version", default="v2-alpha-tpuv5")
            p.add_argument("--spot", action="store_true")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if ns.slices < 1 or not args:
        parser.error("--slices must be >= 1 and a qkv pretrain command must follow --")
    if ns.target == "gke":
        chips = 1
        for part in ns.topology.split("x"):
            chips *= int(part)
        hosts = ns.hosts or max(chips // ns.chips_per_host, 1)
        yaml.safe_dump(jobset_manifest(ns.name, ns.slices, ns.accelerator, ns.topology, hosts, ns.chips_per_host,
                                       ns.image, ns.bucket, args), sys.stdout, sort_keys=False)
    else:
        for cmd in tpu_vm_commands(ns.name, ns.slices, ns.accelerator, ns.zone, args, ns.runtime_version, ns.spot):
            print(" ".join(shlex.quote(a) for a in cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
