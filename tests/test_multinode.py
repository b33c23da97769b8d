"""Two "machines" on one host: launch.sh started twice, NODE_RANK 0 and 1, rendezvous over 127.0.0.1, one CPU
process each, writing into one --save_dir as nodes do on a shared file system. The run must train the same
model as one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import (REPO, TINY, child_env, free_port, launching, load_weights, read_jsonl, relative_l2,
                      train_here)

# Two correct topologies differ only by float re-association. Measured here: 2.9e-6 relative L2 after
# 10 AdamW steps (2 nodes x 1 process x 2 accumulation vs 1 process x 4 accumulation); a wrong data split
# or a missing process in the all-reduce gives ~1e-2 (measured 2026-11-27). 1e-5 sits between.
TOPOLOGY_TOLERANCE = 1e-5
TIMEOUT_S = 240


def args_for(noisy_cifar_dir, save_dir) -> list[str]:
    # 288 images at 64 per step: 4 full steps and a last one of 32 in each epoch.
    return TINY + ["--data_dir", noisy_cifar_dir, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "64",
                   "--micro_batch_size", "16", "--save_dir", save_dir]


def run_two_nodes(args: list[str], port: int) -> list[subprocess.CompletedProcess]:
    """Start launch.sh as node 0 and node 1; if one fails, stop the other instead of letting it wait."""
    procs = []
    for rank in (0, 1):
        env = child_env(NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1", GPUS="0", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        for name in [k for k in env if k.startswith("SLURM_")]:
            del env[name]
        procs.append(subprocess.Popen([str(REPO / "launch.sh"), *map(str, args)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # its own session: the launcher and its workers
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
@launching
def runs(noisy_cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    nodes = run_two_nodes(args_for(noisy_cifar_dir, root / "two_nodes"), free_port())
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{node.stdout[-3000:]}\n{node.stderr[-5000:]}"
    # One process, accumulation 4: the same global batch of 64.
    single = train_here(args_for(noisy_cifar_dir, root / "one_process"))
    return root / "two_nodes", root / "one_process", nodes, single


def test_both_nodes_exit_0_and_form_one_group_of_two(runs):
    two, _, nodes, _ = runs
    assert [n.returncode for n in nodes] == [0, 0]
    resolved = json.loads((two / "config.json").read_text())["resolved"]
    assert resolved["processes"] == 2 and resolved["num_machines"] == 2
    assert resolved["distributed_type"] == "MULTI_CPU"  # gloo on CPU, through launch.sh's --device cpu
    assert (resolved["micro_batch_size"], resolved["accumulation_steps"], resolved["global_batch_size"]) == (16, 2, 64)


def test_launch_sh_chose_the_multi_node_config(runs):
    *_, nodes, _ = runs
    for rank, node in enumerate(nodes):
        # `accelerate launch` through trainer/accelerate_launch.py (quiet when every worker explained its exit).
        command = [line for line in node.stderr.splitlines()
                   if line.startswith(f"launch.sh: python {REPO}/trainer/accelerate_launch.py --config_file")]
        assert len(command) == 1, node.stderr[-2000:]
        assert "accelerate_configs/multi_node.yaml --num_processes 2 --num_machines 2" in command[0]
        assert f"--machine_rank {rank} --main_process_ip 127.0.0.1" in command[0]
        assert "trainer/main.py --device cpu --model test_vit" in command[0]


def test_each_node_reports_once_and_records_are_written_once(runs):
    two, _, nodes, _ = runs
    # The trainer prints on the job's main process only (accelerate's print would speak once per node).
    assert [n.stdout.count("model test_vit") for n in nodes] == [1, 0]
    # The files in the shared save_dir are written by the global main process only: no line twice.
    assert [m["epoch"] for m in read_jsonl(two / "metrics.jsonl")] == [1, 2]
    assert [s["step"] for s in read_jsonl(two / "steps.jsonl")] == list(range(1, 11))


def test_two_nodes_train_the_same_weights_as_one_process(runs):
    two, one, *_ = runs
    distance = relative_l2(load_weights(one / "epoch_2/model.safetensors"), load_weights(two / "epoch_2/model.safetensors"))
    print(f"two nodes vs one process: relative L2 {distance:.3g}")
    assert distance < TOPOLOGY_TOLERANCE, distance


def test_two_nodes_have_the_same_metrics_and_schedule_as_one_process(runs):
    two, one, *_ = runs
    metrics_two, metrics_one = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [m["epoch"] for m in metrics_two] == [1, 2]
    assert [m["val_acc1"] for m in metrics_two] == [m["val_acc1"] for m in metrics_one]
    assert all(m["val_images"] == 201 for m in metrics_two)  # each test image counted once over both nodes
    for a, b in zip(metrics_two, metrics_one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert [s["lr"] for s in read_jsonl(two / "steps.jsonl")] == [s["lr"] for s in read_jsonl(one / "steps.jsonl")]


def test_the_shared_save_dir_holds_one_complete_checkpoint(runs):
    two, *_ = runs
    from trainer.checkpoint import verify
    verify(two / "epoch_2")  # every file in the manifest, hashes match (both nodes wrote into it)
    assert (two / "latest").read_text().strip() == "epoch_2"
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]  # no staging folder left behind
