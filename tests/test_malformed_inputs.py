"""Malformed topology and scenario files: the CLI prints one line naming the file and key path, exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from mooncake_sim.cli import main

DATA = Path(__file__).parent / "data" / "malformed"

#: fixture file -> (key path the message must name, words the message must contain)
CASES: dict[str, tuple[str, str]] = {
    "topo-bad-yaml.yaml": ("line 3, column 11", "YAML syntax error"),
    "topo-not-mapping.yaml": ("topo-not-mapping.yaml", "top level must be a mapping"),
    "topo-unknown-key.yaml": ("hosts[0].gpu", "did you mean 'gpus'"),
    "topo-wrong-type.yaml": ("hosts[0].numa", "must be an integer"),
    "topo-missing-required.yaml": ("hosts[0].nics[0].rate_gbps", "required"),
    "topo-dangling-mnnvl-host.yaml": ("mnnvl_domains[0].hosts[1]", "no host named 'tray7'"),
    "topo-dangling-near-gpu.yaml": ("hosts[0].nics[0].near_gpus[1]", "GPU 9"),
    "topo-negative-bandwidth.yaml": ("link_classes.nvlink.bandwidth_GBps", "positive"),
    "topo-negative-latency.yaml": ("link_classes.pcie.latency_us", "positive"),
    "topo-duplicate-host.yaml": ("hosts[1].name", "duplicate host name 'box0'"),
    "topo-duplicate-nic.yaml": ("hosts[0].nics[1].name", "duplicate NIC name 'eth0'"),
    "topo-unknown-link-class.yaml": ("link_classes.nvlnk", "did you mean 'nvlink'"),
    "topo-unknown-template.yaml": ("hosts[0].template", "unknown template 'hgx-h100'"),
    "topo-bad-nic-type.yaml": ("hosts[0].nics[0].type", "rdma, tcp"),
    "topo-zero-count.yaml": ("hosts[0].gpus.count", "got 0"),
    "topo-gpu-numa-out-of-range.yaml": ("hosts[0].gpus.numa[3]", "NUMA node 2 does not exist"),
    "topo-duplicate-yaml-key.yaml": ("line 4, column 5", "duplicate key 'numa'"),
    "scen-rank-missing-gpu.yaml": ("placement[1].gpu", "GPU 8 does not exist"),
    "scen-missing-host.yaml": ("placement[0].host", "no host 'node9'"),
    "scen-too-many-ranks.yaml": ("ranks", "16 ranks but topology 'hgx-h100' has 8 GPUs"),
    "scen-placement-length.yaml": ("placement", "lists 2 ranks but ranks is 3"),
    "scen-unknown-cause.yaml": ("expect.cause", "did you mean 'lazy-kernel-load'"),
    "scen-unknown-preset.yaml": ("policy", "unknown policy preset 'legacy-1756'"),
    "scen-unknown-switch.yaml": ("policy.overrides.preload_kernels", "did you mean 'preload_reduce_kernels'"),
    "scen-root-out-of-range.yaml": ("workload[0].root", "rank 4 does not exist"),
    "scen-bad-input-rule.yaml": ("workload[0].input", "not linear"),
    "scen-unknown-fault-kind.yaml": ("faults[0].kind", "did you mean 'hold_port'"),
    "scen-fault-rank-out-of-range.yaml": ("faults[0].rank", "rank 2 does not exist"),
    "scen-bad-env-key.yaml": ("env.MC_FORCE_TPC", "did you mean 'MC_FORCE_TCP'"),
    "scen-reduce-op-on-broadcast.yaml": ("workload[0].reduce_op", "not broadcast"),
    "scen-unknown-top-key.yaml": ("rank", "did you mean 'ranks'"),
    "scen-missing-topology-file.yaml": ("topology", "not found"),
    "scen-unknown-topology.yaml": ("topology", "no bundled topology named 'hgx-h1000'; use one of: cpu-host,"),
    "scen-bad-dtype.yaml": ("workload[0].dtype", "float8"),
}


def test_every_fixture_has_a_case() -> None:
    assert sorted(p.name for p in DATA.glob("*.yaml")) == sorted(CASES)
    assert len(CASES) >= 15


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_malformed_input_one_line_error(fixture: str, capsys: pytest.CaptureFixture[str]) -> None:
    key, words = CASES[fixture]
    f = str(DATA / fixture)
    assert main(["validate", f]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert "Traceback" not in err
    assert line.startswith(f"{f}: "), line
    assert f": {key}: " in line or (key == fixture and line.startswith(f)), line
    assert words in line, line


def test_valid_and_invalid_together(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["validate", "hgx-h100", str(DATA / "topo-duplicate-host.yaml"), "example-hgx-allreduce"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "ok hgx-h100 (topology: 1 hosts, 8 GPUs)" in out
    assert "ok example-hgx-allreduce (scenario: 8 ranks on hgx-h100)" in out
    assert len(err.strip().splitlines()) == 1


def test_validate_all_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--all"]) == 0
    out, _ = capsys.readouterr()
    assert "ok gb200-nvl72 (topology: 18 hosts, 72 GPUs)" in out


def test_unknown_bundled_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "no-such-thing"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("no-such-thing: no bundled topology or scenario")


def test_topo_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topo", "list"]) == 0
    out, _ = capsys.readouterr()
    assert "gb200-nvl72" in out and "pcie-4gpu" in out
    dot = tmp_path / "g.dot"
    assert main(["topo", "show", "gb200-nvl72", "--dot", str(dot)]) == 0
    out, _ = capsys.readouterr()
    assert "1 MNNVL domain: nvl72 (72 GPUs, IMEX on)" in out
    assert dot.read_text().startswith('graph "gb200-nvl72"')
    assert main(["topo", "show", "hgx-h100-x2-cloned"]) == 0
    out, _ = capsys.readouterr()
    assert "cloned image" in out
    assert main(["topo", "show", str(DATA / "topo-bad-nic-type.yaml")]) == 2


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["validate", "--help"], ["topo", "--help"], ["topo", "show", "--help"], ["run", "--help"]):
        assert main(argv) == 0
    assert main(["bogus"]) == 2


def test_check_output_names_the_option_and_what_is_wrong(tmp_path: Path) -> None:
    from mooncake_protocol.errors import InputError
    from mooncake_protocol.resources import check_output

    check_output("-", "--trace")
    check_output(str(tmp_path / "t.jsonl"), "--trace")
    check_output(str(tmp_path / "new" / "deeper"), "--keep", directory=True)  # made with its parents later
    (tmp_path / "f").write_text("")
    cases = [((str(tmp_path / "no" / "t.jsonl"), "--trace"), f"directory {tmp_path / 'no'} does not exist"),
             ((str(tmp_path), "--trace"), "it is a directory; name a file"),
             ((str(tmp_path / "f"), "--keep", True), "it is a file, not a directory"),
             ((str(tmp_path / "f" / "sub"), "--keep", True), f"{tmp_path / 'f'} is a file")]
    for args, words in cases:
        with pytest.raises(InputError) as exc:
            check_output(*args[:2], directory=len(args) > 2)
        assert str(exc.value).startswith(f"{args[1]}: cannot ") and words in str(exc.value), str(exc.value)


@pytest.mark.parametrize("argv", [
    ["run", "real-cpu-bootstrap-2", "--trace", "{missing}/t.jsonl"],
    ["run", "real-cpu-bootstrap-2", "--json", "--trace", "-"],
    ["topo", "show", "hgx-h100", "--dot", "{missing}/g.dot"],
    ["parity", "real-cpu-bootstrap-2", "--keep", "{file}"],
])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import mooncake_sim.parity
    import mooncake_sim.runner

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("ran although its output could not be written")

    monkeypatch.setattr(mooncake_sim.runner, "run_one", never)
    monkeypatch.setattr(mooncake_sim.parity, "parity", never)
    (tmp_path / "a-file").write_text("")
    argv = [a.format(missing=tmp_path / "missing", file=tmp_path / "a-file") for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and (": cannot " in lines[0] or "also prints to stdout" in lines[0]), captured.err
    assert argv[-2] in lines[0], captured.err
    assert captured.out == ""


@pytest.mark.parametrize("argv", [["run", "--seed", "-1"], ["run", "real-cpu-bootstrap-2", "--seed", "-3"]])
def test_a_negative_seed_is_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("--seed: must be an integer >= 0") and "\n" not in err, err


def test_a_directory_named_as_a_scenario_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{tmp_path}: {str(tmp_path)!r} is a directory; name a .yaml file in it", err


def test_a_reader_that_goes_away_stops_the_output_quietly() -> None:
    """`mooncake-sim run X --trace - | head -1`: the trace's reader closes the pipe early; the command stops
    without a traceback or an error line (exit 141, as a process killed by SIGPIPE shows in a shell)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mooncake_sim.cli", "run", "stale-task-id", "--trace", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("{")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == "", err
