"""tools/ncu_stalls.py on a small export in the layout of `ncu --page source --csv`."""

import pytest
from repo_files import load_file

ncu_stalls = load_file("_sageattn_ncu_stalls", "tools/ncu_stalls.py")

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued '
          'Samples)","Instructions Executed","stall_wait","stall_mio","stall_barrier",'
          '"stall_wait (Not Issued)"')
ROWS = [  # address, source, samples, executed, wait, mio, barrier
    ("0x10", "LDC R1, c[0x0][0x28]", 2, 10, 2, 0, 0),
    ("0x20", "@!P0  BRA 0x20", 40, 5000, 40, 0, 0),          # a spin-wait: most executed
    ("0x30", "FFMA R2, R3, R4, R5", 10, 100, 6, 0, 0),       # loop body: executed 100 times
    ("0x40", "MUFU.EX2 R2, R2", 30, 100, 10, 20, 0),
    ("0x50", "QGMMA.64x136x32.F32.E4M3.E4M3 R24, R92", 12, 100, 2, 0, 0),  # 10 unnamed
    ("0x60", "@P1 MUFU.EX2 R6, R6", 8, 100, 0, 8, 0),
    ("0x70", "WARPGROUP.DEPBAR.LE gsb0, 0x0", 20, 100, 0, 0, 20),
    ("0x80", "EXIT", 1, 10, 1, 0, 0),
]


def write_export(path, kernels=("k_one",)):
    lines = []
    for name in kernels:
        lines += [f'"Kernel Name","{name}",', HEADER]
        lines += [f'"{a}","{s}","{n}","0","{e}","{w}","{m}","{b}","0"' for a, s, n, e, w, m, b in ROWS]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_reads_instructions_opcodes_and_unnamed_samples(tmp_path):
    kernels = ncu_stalls.read_kernels(write_export(tmp_path / "src.csv", ("k_one", "k_two")))
    assert list(kernels) == ["k_one", "k_two"]
    ins = kernels["k_one"]
    assert [i.opcode for i in ins] == ["LDC", "BRA", "FFMA", "MUFU", "QGMMA", "MUFU", "WARPGROUP", "EXIT"]
    assert ins[3].reasons == {"wait": 10, "mio": 20, "barrier": 0}  # "(Not Issued)" columns left out
    assert ins[4].reasons[ncu_stalls.UNNAMED] == 10                  # 12 samples, 2 with a reason
    assert all(sum(i.reasons.values()) == i.samples for i in ins)


def test_loop_is_the_execution_count_holding_the_most_samples(tmp_path):
    ins = ncu_stalls.read_kernels(write_export(tmp_path / "src.csv"))["k_one"]
    # The spin-wait runs 5000 times but holds 40 samples; the 100-times body holds 80.
    assert ncu_stalls.loop_span(ins) == (2, 6)


def test_report_shares(tmp_path, capsys):
    path = write_export(tmp_path / "src.csv")
    assert ncu_stalls.main([path, "--loop", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "Instructions 2..6 of 8: 80 of 123 stall samples (65.0%)." in out
    # MUFU: two instructions, 38 of 80 samples; wait 10, mio 28
    assert "| MUFU | 2 | 47.5% | mio 35.0%, wait 12.5% |" in out
    assert "| QGMMA | 1 | 15.0% | (unnamed) 12.5%, wait 2.5% |" in out
    # unnamed: QGMMA's 10 and FFMA's 4 (10 samples, 6 with a reason)
    assert "Reasons: mio 35.0%, barrier 25.0%, wait 22.5%, (unnamed) 17.5%" in out
    top = out.split("| index |")[1].splitlines()[2:]
    assert top[0].startswith("| 3 | 0x40 | 37.5% | `MUFU.EX2 R2, R2` | mio 25.0%, wait 12.5% |")
    assert top[1].startswith("| 6 | 0x70 | 25.0% | `WARPGROUP.DEPBAR.LE gsb0, 0x0` | barrier 25.0% |")
    assert len([line for line in top if line.startswith("|")]) == 2  # --top 2


def test_range_and_errors(tmp_path, capsys):
    path = write_export(tmp_path / "src.csv")
    assert ncu_stalls.main([path, "--range", "0", "1"]) == 0
    assert "Instructions 0..1 of 8: 42 of 123" in capsys.readouterr().out
    assert ncu_stalls.main([path, "--kernel", "nope"]) == 2
    assert "no kernel 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text('"Address","Source"\n"0x10","NOP"\n')
    assert ncu_stalls.main([str(bad)]) == 2
    with pytest.raises(SystemExit):
        ncu_stalls.main([path, "--loop", "--range", "0", "1"])
