"""csrc/linear_attn/sm90_tiles.h on the CPU: the swizzled tile offsets and the accumulator
coordinates that the wgmma linear-attention kernels compute by hand, against CuTe's own layouts
(tests/cpp/gmma_tiles_host.cpp, built with g++). A CUTLASS update that moved a GMMA layout would
fail here instead of as wrong numbers on a GPU."""
from test_dropout_cpu import build_host_program


def test_tile_offsets_and_accumulator_pairs_match_cute(tmp_path_factory):
    run = build_host_program(tmp_path_factory, "gmma_tiles_host")()
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-2000:] + run.stderr[-2000:]
