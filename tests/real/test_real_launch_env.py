"""launch_env: torchrun and SLURM variables."""

from __future__ import annotations

import pytest

from mooncake_real.launch_env import LaunchEnv, LaunchEnvError, first_slurm_host, launch_env


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    assert launch_env(env) == LaunchEnv(3, 8, 1, "node0", 29400, "torchrun", 29400)


def test_the_store_port_leaves_torchruns_own_store_its_port():
    """torchrun's agent serves its TCPStore on MASTER_PORT (its workers carry TORCHELASTIC_RUN_ID): the job's store
    goes one above; MOONCAKE_REAL_STORE_PORT names it outright; plain variables or SLURM keep MASTER_PORT."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    assert launch_env(env).store_port == 29400
    assert launch_env(dict(env, TORCHELASTIC_RUN_ID="none")).store_port == 29401
    assert launch_env(dict(env, TORCHELASTIC_RUN_ID="none", MOONCAKE_REAL_STORE_PORT="31000")).store_port == 31000
    with pytest.raises(LaunchEnvError, match="set MOONCAKE_REAL_STORE_PORT"):
        launch_env(dict(env, TORCHELASTIC_RUN_ID="none", MASTER_PORT="65535"))
    with pytest.raises(LaunchEnvError, match="MOONCAKE_REAL_STORE_PORT=70000 is not a TCP port"):
        launch_env(dict(env, MOONCAKE_REAL_STORE_PORT="70000"))


def test_torchrun_local_rank_defaults_to_rank():
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert launch_env(env).local_rank == 0


def test_slurm_with_nodelist_and_default_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[03-05,07],cpu1"}
    le = launch_env(env)
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port, le.source) == (5, 16, 5, "gpu03", 29500, "slurm")


def test_slurm_master_vars_win():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "99", "SLURM_JOB_NODELIST": "x1"}
    le = launch_env(env)
    assert (le.master_addr, le.master_port) == ("h", 99)


def test_torchrun_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert launch_env(env).source == "torchrun"


@pytest.mark.parametrize("env, text", [
    ({}, "neither RANK/WORLD_SIZE"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 must be >= 0"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 is not below the world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "MASTER_PORT is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "70000"}, "not a TCP port"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "MASTER_ADDR is not set"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS is not set"),
])
def test_errors_are_one_line(env, text):
    with pytest.raises(LaunchEnvError) as ei:
        launch_env(env)
    assert text in str(ei.value)
    assert "\n" not in str(ei.value)


def test_first_slurm_host():
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a[1-3]") == "a1"
    assert first_slurm_host("rack-b[010,012],x") == "rack-b010"
