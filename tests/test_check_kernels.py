"""`python -m roi_cupy check-kernels`: every kernel instantiation compiles through NVRTC for every
target architecture without a warning, and a broken source is caught. No GPU needed."""
from __future__ import annotations

import io

import numpy
import pytest

from roi_cupy._cuda import check, kernels


def _tools_missing() -> str:
    try:
        check.include_dir()
        check._nvrtc()
    except check.ToolsMissing as exc:
        return str(exc)
    return ""


pytestmark = pytest.mark.skipif(
    bool(_tools_missing()), reason=f"NVRTC or CUDA headers missing: {_tools_missing()}"
)


@pytest.fixture(scope="module")
def results() -> list[check.ArchResult]:
    return check.check()


def test_every_instantiation_compiles_clean_for_every_arch(results):
    assert [r.arch for r in results] == list(check.ARCHS)
    for r in results:
        assert r.ok, f"{r.arch}: {r.problems}\n{r.log}"
        assert sorted(r.kernels) == sorted(kernels.NAME_EXPRESSIONS)


# RoI Align's avg kernels keep a block's per-axis tables in static shared memory (at most the
# 48 KiB a block may declare statically); no other kernel uses any.
TABLE_KERNELS = ("roi_align_forward", "roi_align_backward", "roi_align_backward_deterministic")


def test_no_kernel_spills_and_only_the_tables_use_shared_memory(results):
    for r in results:
        for name, s in r.kernels.items():
            assert 0 < s.registers <= 255, (r.arch, name, s)
            assert (s.spill_stores, s.spill_loads, s.stack) == (0, 0, 0), (r.arch, name, s)
            if name.split("<")[0] in TABLE_KERNELS:
                assert 0 < s.shared <= 48 * 1024, (r.arch, name, s)
            else:
                assert s.shared == 0, (r.arch, name, s)


def test_name_expressions_cover_every_kernel_dtype_and_index_width():
    # Every kernel but roi_check x four storage dtypes x two index widths, roi_check for the two
    # compute dtypes the RoIs come in, and roi_check_indices for each index width.
    assert "roi_check" in kernels.KERNELS and "roi_fixed_finish" in kernels.KERNELS
    assert len(set(kernels.NAME_EXPRESSIONS)) == (len(kernels.KERNELS) - 1) * 4 * 2 + 2 * 2 + 2
    assert "ps_roi_pool_backward<__nv_bfloat16, long long>" in kernels.NAME_EXPRESSIONS
    assert "roi_align_max_backward<__half, long long>" in kernels.NAME_EXPRESSIONS
    assert "multi_scale_roi_align_backward<__half, long long>" in kernels.NAME_EXPRESSIONS
    assert "roi_align_rotated_backward<__half, long long>" in kernels.NAME_EXPRESSIONS
    assert "roi_check_indices<long long>" in kernels.NAME_EXPRESSIONS
    assert "roi_pool_backward<__half, long long>" in kernels.NAME_EXPRESSIONS
    assert "roi_align_backward<__nv_bfloat16, int>" in kernels.NAME_EXPRESSIONS
    assert "roi_align_forward<float, int>" in kernels.NAME_EXPRESSIONS
    assert "roi_check<double, int>" in kernels.NAME_EXPRESSIONS
    assert "roi_check<__half, int>" not in kernels.NAME_EXPRESSIONS
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        kernels.name_expression("roi_align_forward", numpy.dtype(numpy.int32), False)
    with pytest.raises(TypeError):
        kernels.name_expression("roi_check", numpy.dtype(numpy.float16), False)


def test_source_joins_the_files_without_the_local_include():
    text = kernels.source()
    assert '#include "roi_common.cuh"' not in text
    assert text.count("#include <cuda_fp16.h>") == 1
    assert text.count("#include <cuda_bf16.h>") == 1
    for path in kernels.source_files():
        assert path.read_text(encoding="utf-8").splitlines()[-1] in text


def test_command_prints_the_table_and_succeeds(capsys):
    assert check.main(["--arch", "sm_80"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "roi_align_forward<__half, long long>" in out and "sm_80" in out
    assert "compiled without warnings" in out
    # Progress goes to stderr, a line as each architecture starts and ends; stdout keeps the report.
    total = len(kernels.NAME_EXPRESSIONS)
    progress = captured.err.splitlines()
    assert progress[0] == f"[1/1] sm_80: compiling {total} instantiations ..."
    assert progress[1].startswith("[1/1] sm_80: ") and progress[1].endswith(" s, ok")
    assert "compiling" not in out


def test_progress_names_each_architecture_and_a_failure(capsys):
    lines = io.StringIO()
    results = check.check(["sm_75", "sm_80"], source=kernels.source() + "\n}\n", progress=lines)
    assert [r.ok for r in results] == [False, False]
    progress = lines.getvalue().splitlines()
    assert [line.split(":")[0] for line in progress] == ["[1/2] sm_75"] * 2 + ["[2/2] sm_80"] * 2
    assert progress[1].endswith("FAILED: compilation failed")
    assert capsys.readouterr() == ("", "")  # progress goes only to the stream given


def test_syntax_error_fails():
    (r,) = check.check(["sm_80"], source=kernels.source() + "\n}\n")
    assert not r.ok and "compilation failed" in r.problems


def test_warning_fails():
    extra = "\ntemplate <typename T> __global__ void extra(T* p) { int unused = 1; p[0] = T(0); }\n"
    (r,) = check.check(
        ["sm_80"],
        source=kernels.source() + extra,
        name_expressions=(*kernels.NAME_EXPRESSIONS, "extra<float>"),
    )
    assert not r.ok
    assert any("warning" in p and "unused" in p for p in r.problems), r.problems


def test_double_arithmetic_in_a_float_kernel_fails():
    src = kernels.source().replace("w = w / C(a.grid);", "w = w / (C(a.grid) * 1.000001);", 1)
    assert src != kernels.source()
    (r,) = check.check(["sm_80"], source=src)
    assert "roi_align_forward<float, int> uses double-precision arithmetic" in r.problems
    assert not any("<double," in p for p in r.problems)


def test_unknown_name_expression_fails():
    (r,) = check.check(["sm_80"], name_expressions=("roi_align_forward<int, int>",))
    assert not r.ok
