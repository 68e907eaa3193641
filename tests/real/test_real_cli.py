"""mooncake-real CLI and topology discovery."""

from __future__ import annotations

import pytest

from mooncake_protocol.topology import gpus, hosts, load_topology, nics
from mooncake_real.cli import main
from mooncake_real.discover import discover, to_yaml, write_topology


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["rank", "--help"], ["discover", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 0
    assert "usage: mooncake-real" in capsys.readouterr().out


def test_rank_without_launcher_variables_is_one_line_exit_2(capsys, monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(v, raising=False)
    assert main(["rank", "--token", "t"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mooncake-real: neither RANK/WORLD_SIZE") and "\n" not in err


def test_rank_without_token_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.delenv("MOONCAKE_REAL_TOKEN", raising=False)
    assert main(["rank"]) == 2
    assert "MOONCAKE_REAL_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["run", "real-cpu-bootstrap-2"], ["rank", "--token", "t"]])
@pytest.mark.parametrize("value", ["0", "-3", "nan"])
def test_a_deadline_that_is_not_positive_is_one_line_exit_2(cmd, value, capsys):
    assert main([*cmd, "--deadline", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mooncake-real: --deadline: must be a positive number of seconds, got {float(value):g}", err


def test_run_unknown_scenario_exit_2(capsys):
    assert main(["run", "no-such-scenario-anywhere"]) == 2
    assert "no bundled scenario" in capsys.readouterr().err


def test_discover_writes_a_loadable_topology(tmp_path):
    out = tmp_path / "me.yaml"
    assert main(["discover", "-o", str(out)]) == 0
    topo = load_topology(str(out))
    assert len(hosts(topo)) == 1
    assert out.read_text().startswith("# discovered by mooncake-real discover")


def _fake_sys(root):
    (root / "devices/system/node/node0").mkdir(parents=True)
    (root / "devices/system/node/node1").mkdir(parents=True)
    (root / "devices/system/node/online").write_text("0-1")
    for name, numa, speed in (("ens1", 1, "100000"), ("lo", 0, "-1"), ("veth9", 0, "10000")):
        d = root / "class/net" / name
        (d / "device").mkdir(parents=True)
        (d / "device/numa_node").write_text(str(numa))
        (d / "speed").write_text(speed)
        (d / "operstate").write_text("up")
    ib = root / "class/infiniband/mlx5_0"
    (ib / "ports/1").mkdir(parents=True)
    (ib / "ports/1/rate").write_text("400 Gb/sec (4X NDR)")
    (ib / "device").mkdir()
    (ib / "device/numa_node").write_text("1")


def test_discover_from_a_fake_sysfs(tmp_path):
    _fake_sys(tmp_path / "sys")
    doc = discover(sys_root=tmp_path / "sys", hostname="box.example", with_gpus=False)
    host = doc["hosts"][0]
    assert host["name"] == "box.example" and host["numa"] == 2
    assert host["nics"] == [
        {"name": "mlx5_0", "type": "rdma", "rate_gbps": 400, "numa": 1},
        {"name": "ens1", "type": "tcp", "rate_gbps": 100, "numa": 1},
    ]
    assert {n["type"] for n in doc["networks"]} == {"tcp", "rdma"}
    path = write_topology(tmp_path / "t.yaml", doc)
    topo = load_topology(str(path))
    assert [n.type for n in nics(topo, "box.example")] == ["rdma", "tcp"]
    assert gpus(topo, "box.example") == []
    assert "_comments" not in to_yaml(doc)


@pytest.mark.parametrize("argv", [
    ["calibrate", "--quick", "-o", "{missing}/cal.json"],
    ["discover", "-o", "{missing}/topo.yaml"],
    ["run", "real-cpu-bootstrap-2", "--trace", "{missing}/t.jsonl"],
    ["run", "real-cpu-bootstrap-2", "--json", "--trace", "-"],
])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(argv, tmp_path, capsys, monkeypatch):
    """calibrate measures for tens of seconds and run starts processes: a typo in the output path is a one-line
    error, exit 2, before that (it used to be a traceback after the work)."""
    import mooncake_real.calibrate
    import mooncake_real.discover
    import mooncake_real.runner

    def never(*_a, **_k):
        raise AssertionError("did the work although its output could not be written")

    monkeypatch.setattr(mooncake_real.calibrate, "calibrate", never)
    monkeypatch.setattr(mooncake_real.discover, "discover", never)
    monkeypatch.setattr(mooncake_real.runner, "run_outcome", never)
    argv = [a.format(missing=tmp_path / "missing") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mooncake-real: --") and ("does not exist; create it or pick another path" in err
                                                     or "--json also prints to stdout" in err), err
    assert "\n" not in err
