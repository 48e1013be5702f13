// The only file that knows about Python: argument checking, GIL release, and mapping pydetox::Error to
// pydetox.errors.NativeError. Every array is checked here so that bad input raises instead of crashing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "error.hpp"
#include "ggml_api.hpp"
#include "kernels.hpp"
#include "tensor_edit.hpp"

namespace py = pybind11;
using pydetox::Error;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style>;

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// A writable float32 C-contiguous 2-D matrix, edited in place.
py::array_t<float> matrix(py::array W) {
    if (!py::isinstance<py::array_t<float>>(W) || W.ndim() != 2 || !(W.flags() & py::array::c_style) ||
        !W.writeable()) {
        throw Error("expected a writable float32 C-contiguous 2-D matrix, got dtype " +
                    std::string(py::str(W.dtype())) + " with shape " + shape_str(W));
    }
    return py::reinterpret_borrow<py::array_t<float>>(W);
}

void expect_shape(const F32& a, std::vector<int64_t> shape, const char* what) {
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
    if (!ok) {
        std::string want = "(";
        for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
        throw Error(std::string(what) + ": expected shape " + want + (shape.size() == 1 ? ",)" : ")") + ", got " +
                    shape_str(a));
    }
}

int64_t basis_rank(const F32& basis, int64_t n, const char* what) {
    if (basis.ndim() != 2 || basis.shape(1) != n || basis.shape(0) < 1) {
        throw Error(std::string(what) + ": expected a basis of shape (k, " + std::to_string(n) + ") with k >= 1, got " +
                    shape_str(basis));
    }
    return basis.shape(0);
}

// Row numbers of an add_rows edit: k >= 1 whole numbers in [0, rows), no repeats.
int64_t row_indices(const F32& idx, int64_t rows) {
    if (idx.ndim() != 1 || idx.shape(0) < 1) {
        throw Error("add_rows row numbers: expected shape (k,) with k >= 1, got " + shape_str(idx));
    }
    std::vector<bool> seen(static_cast<size_t>(rows), false);
    const float* p = idx.data();
    for (py::ssize_t j = 0; j < idx.shape(0); ++j) {
        const float v = p[j];
        if (!(v >= 0.f) || v >= static_cast<float>(rows) || v != static_cast<float>(static_cast<int64_t>(v))) {
            throw Error("add_rows row numbers: expected whole numbers in [0, " + std::to_string(rows) + "), found " +
                        std::to_string(v) + " at " + std::to_string(j));
        }
        if (seen[static_cast<size_t>(v)]) throw Error("add_rows row numbers: row " + std::to_string(v) + " repeats");
        seen[static_cast<size_t>(v)] = true;
    }
    return idx.shape(0);
}

const float* gain_ptr(const F32* gain, int64_t k) {
    if (gain == nullptr) return nullptr;
    expect_shape(*gain, {k}, "gain");
    return gain->data();
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "pydetox native core: weight-edit kernels and the tensor pipeline over libggml's quantizers";
    auto errors = py::module_::import("pydetox.errors");
    py::register_exception<Error>(m, "NativeError", errors.attr("PydetoxError"));
    // registered second, so it is tried first for an IoError (pybind11 tries translators newest first)
    py::register_exception<pydetox::IoError>(m, "NativeIOError", errors.attr("OutputError"));
    m.def("release_workspace", &pydetox::release_workspace);

    // The edit kinds and the per-tensor measurements, bound once so that Python never copies their numbers.
    py::enum_<pydetox::OpKind>(m, "OpKind", "An edit kind of the tensor pipeline (pydetox.plan.EditKind, by name).")
        .value("PROJECT_OUT", pydetox::OpKind::ProjectOut)
        .value("PROJECT_IN", pydetox::OpKind::ProjectIn)
        .value("LOW_RANK", pydetox::OpKind::LowRank)
        .value("SCALE_ROWS", pydetox::OpKind::ScaleRows)
        .value("SCALE_COLS", pydetox::OpKind::ScaleCols)
        .value("ADD_ROWS", pydetox::OpKind::AddRows);
    py::class_<pydetox::OpStats>(m, "OpStats",
                                 "For a projection: removed = ||(1 - g) P W0||; survived_f32 / survived = ||P W' - g "
                                 "P W0|| before / after requantization. Zeros for other kinds.")
        .def_readonly("removed", &pydetox::OpStats::removed)
        .def_readonly("survived_f32", &pydetox::OpStats::survived_f32)
        .def_readonly("survived", &pydetox::OpStats::survived);
    py::class_<pydetox::TensorStats>(m, "TensorStats",
                                     "One tensor through process_tensor: stage times in seconds and norms (the "
                                     "dequantized input, the edit in float, the edited tensor, the requantization "
                                     "error).")
        .def_readonly("dequantize_s", &pydetox::TensorStats::dequantize_s)
        .def_readonly("edit_s", &pydetox::TensorStats::edit_s)
        .def_readonly("quantize_s", &pydetox::TensorStats::quantize_s)
        .def_readonly("verify_s", &pydetox::TensorStats::verify_s)
        .def_readonly("write_s", &pydetox::TensorStats::write_s)
        .def_readonly("norm_orig", &pydetox::TensorStats::norm_orig)
        .def_readonly("norm_delta", &pydetox::TensorStats::norm_delta)
        .def_readonly("norm_edited", &pydetox::TensorStats::norm_edited)
        .def_readonly("norm_quant_err", &pydetox::TensorStats::norm_quant_err)
        .def_readonly("ops", &pydetox::TensorStats::ops);

    m.def("load_ggml", &pydetox::ggml::load, py::arg("path"));
    m.def("ggml_loaded", &pydetox::ggml::loaded);
    m.def(
        "type_info",
        [](int type) {
            const auto& t = pydetox::ggml::traits(type);
            return py::make_tuple(std::string(t.type_name), t.blck_size, t.type_size, t.is_quantized,
                                  type == 0 || t.to_float != nullptr);
        },
        py::arg("type"));
    m.def(
        "requires_imatrix", [](int type) { return pydetox::ggml::api().quantize_requires_imatrix(type); },
        py::arg("type"));
    m.def(
        "check_quantizable", [](int type, int64_t cols) { pydetox::check_quantizable(type, cols); }, py::arg("type"),
        py::arg("cols"));
    m.def(
        "validate_row_data",
        [](const py::array_t<uint8_t, py::array::c_style>& data, int type) {
            const void* p = data.data();
            const size_t n = static_cast<size_t>(data.size());
            py::gil_scoped_release release;
            return pydetox::ggml::api().validate_row_data(type, p, n);
        },
        py::arg("data"), py::arg("type"),
        "ggml_validate_row_data: false where the bytes hold NaN/inf values or corrupt block scales (what llama.cpp's "
        "loader checks with --check-tensors).");

    // Output side: the basis spans the rows; input side: the columns.
    for (const bool out_side : {true, false}) {
        const char* name = out_side ? "project_out" : "project_in";
        m.def(
            name,
            [out_side, name](py::array W, const F32& basis, std::optional<F32> gain, int threads) {
                auto w = matrix(W);
                const int64_t rows = w.shape(0), cols = w.shape(1);
                const int64_t k = basis_rank(basis, out_side ? rows : cols, (std::string(name) + " basis").c_str());
                const float* g = gain_ptr(gain ? &*gain : nullptr, k);
                float* p = w.mutable_data();
                py::gil_scoped_release release;
                (out_side ? pydetox::kernels::project_out : pydetox::kernels::project_in)(p, rows, cols, basis.data(),
                                                                                           k, g, threads);
            },
            py::arg("W"), py::arg("basis"), py::arg("gain") = py::none(), py::arg("threads") = 1);
    }
    m.def(
        "low_rank",
        [](py::array W, const F32& left, const F32& right, int threads) {
            auto w = matrix(W);
            const int64_t rows = w.shape(0), cols = w.shape(1);
            const int64_t k = basis_rank(left, rows, "low_rank left factor");
            expect_shape(right, {k, cols}, "low_rank right factor");
            float* p = w.mutable_data();
            py::gil_scoped_release release;
            pydetox::kernels::low_rank(p, rows, cols, left.data(), right.data(), k, threads);
        },
        py::arg("W"), py::arg("left"), py::arg("right"), py::arg("threads") = 1);
    m.def(
        "scale_rows",
        [](py::array W, const F32& s, int threads) {
            auto w = matrix(W);
            expect_shape(s, {w.shape(0)}, "row scales");
            float* p = w.mutable_data();
            py::gil_scoped_release release;
            pydetox::kernels::scale_rows(p, w.shape(0), w.shape(1), s.data(), threads);
        },
        py::arg("W"), py::arg("scales"), py::arg("threads") = 1);
    m.def(
        "scale_cols",
        [](py::array W, const F32& s, int threads) {
            auto w = matrix(W);
            expect_shape(s, {w.shape(1)}, "column scales");
            float* p = w.mutable_data();
            py::gil_scoped_release release;
            pydetox::kernels::scale_cols(p, w.shape(0), w.shape(1), s.data(), threads);
        },
        py::arg("W"), py::arg("scales"), py::arg("threads") = 1);

    m.def(
        "dequantize",
        [](const U8& src, int type, int64_t rows, int64_t cols, int threads) {
            const size_t need = static_cast<size_t>(rows) * pydetox::ggml::row_bytes(type, cols);
            if (rows <= 0 || static_cast<size_t>(src.size()) != need) {
                throw Error("dequantize: " + std::to_string(rows) + " rows of " + std::to_string(cols) + " " +
                            pydetox::ggml::type_name(type) + " need " + std::to_string(need) + " bytes, got " +
                            std::to_string(src.size()));
            }
            py::array_t<float> out({rows, cols});
            float* dst = out.mutable_data();
            {
                py::gil_scoped_release release;
                pydetox::dequantize(src.data(), type, rows, cols, dst, threads);
            }
            return out;
        },
        py::arg("src"), py::arg("type"), py::arg("rows"), py::arg("cols"), py::arg("threads") = 1);
    m.def(
        "quantize",
        [](const F32& W, int type, std::optional<F32> imatrix, int threads) {
            if (W.ndim() != 2) throw Error("quantize: expected a 2-D matrix, got shape " + shape_str(W));
            const int64_t rows = W.shape(0), cols = W.shape(1);
            pydetox::check_quantizable(type, cols);
            const float* im = nullptr;
            if (imatrix) {
                expect_shape(*imatrix, {cols}, "importance matrix");
                im = imatrix->data();
            }
            U8 out(static_cast<py::ssize_t>(rows * pydetox::ggml::row_bytes(type, cols)));
            uint8_t* dst = out.mutable_data();
            {
                py::gil_scoped_release release;
                pydetox::quantize(W.data(), type, rows, cols, im, dst, threads);
            }
            return out;
        },
        py::arg("W"), py::arg("type"), py::arg("imatrix") = py::none(), py::arg("threads") = 1);

    m.def(
        "process_tensor",
        [](const U8& src, int src_type, int64_t rows, int64_t cols, const py::list& ops, int dst_type,
           std::optional<F32> imatrix, int threads, bool verify, int out_fd, int64_t out_offset) {
            if (rows <= 0 || cols <= 0) {
                throw Error("process_tensor: shape must be positive, got " + std::to_string(rows) + " x " +
                            std::to_string(cols));
            }
            const size_t need = static_cast<size_t>(rows) * pydetox::ggml::row_bytes(src_type, cols);
            if (static_cast<size_t>(src.size()) != need) {
                throw Error("process_tensor: " + std::to_string(rows) + " rows of " + std::to_string(cols) + " " +
                            pydetox::ggml::type_name(src_type) + " need " + std::to_string(need) + " bytes, got " +
                            std::to_string(src.size()));
            }
            pydetox::check_quantizable(dst_type, cols);
            std::vector<F32> keep;  // owns converted arrays while the pointers below are in use
            keep.reserve(3 * ops.size());
            std::vector<pydetox::Op> native;
            for (const auto& item : ops) {
                auto t = item.cast<py::tuple>();
                if (t.size() != 4) throw Error("process_tensor: each op is (kind, a, b, gain)");
                pydetox::Op op;
                if (!py::isinstance<pydetox::OpKind>(t[0])) {
                    throw Error("process_tensor: an op's kind must be a pydetox._core.OpKind, got " +
                                std::string(py::str(py::type::of(t[0]).attr("__name__"))));
                }
                op.kind = t[0].cast<pydetox::OpKind>();
                auto arr = [&](py::handle h) -> const F32* {
                    if (h.is_none()) return nullptr;
                    keep.push_back(F32::ensure(h));
                    if (!keep.back()) throw Error("process_tensor: op arrays must be numeric");
                    return &keep.back();
                };
                const F32* a = arr(t[1]);
                const F32* b = arr(t[2]);
                const F32* g = arr(t[3]);
                if (a == nullptr) throw Error("process_tensor: op " + std::to_string(native.size()) + " has no data");
                switch (op.kind) {
                    case pydetox::OpKind::ProjectOut:
                        op.k = basis_rank(*a, rows, "project_out basis");
                        break;
                    case pydetox::OpKind::ProjectIn:
                        op.k = basis_rank(*a, cols, "project_in basis");
                        break;
                    case pydetox::OpKind::LowRank:
                        op.k = basis_rank(*a, rows, "low_rank left factor");
                        if (b == nullptr) throw Error("low_rank needs a right factor");
                        expect_shape(*b, {op.k, cols}, "low_rank right factor");
                        op.b = b->data();
                        break;
                    case pydetox::OpKind::ScaleRows:
                        expect_shape(*a, {rows}, "row scales");
                        break;
                    case pydetox::OpKind::ScaleCols:
                        expect_shape(*a, {cols}, "column scales");
                        break;
                    case pydetox::OpKind::AddRows:
                        op.k = row_indices(*a, rows);
                        if (b == nullptr) throw Error("add_rows needs the added rows");
                        expect_shape(*b, {op.k, cols}, "add_rows added rows");
                        op.b = b->data();
                        break;
                    default:
                        throw Error("process_tensor: unknown op kind " + std::to_string(static_cast<int>(op.kind)));
                }
                op.a = a->data();
                if (g != nullptr) {
                    if (op.kind != pydetox::OpKind::ProjectOut && op.kind != pydetox::OpKind::ProjectIn) {
                        throw Error("process_tensor: only projections take a gain");
                    }
                    op.gain = gain_ptr(g, op.k);
                }
                native.push_back(op);
            }
            const float* im = nullptr;
            if (imatrix) {
                expect_shape(*imatrix, {cols}, "importance matrix");
                im = imatrix->data();
            }
            const size_t out_bytes = static_cast<size_t>(rows) * pydetox::ggml::row_bytes(dst_type, cols);
            pydetox::TensorStats st;
            if (out_fd >= 0) {
                // Straight from the reused workspace to the file: no Python buffer, no fresh pages per tensor.
                if (out_offset < 0) throw Error("process_tensor: negative output offset");
                {
                    py::gil_scoped_release release;
                    uint8_t* dst = pydetox::output_workspace(out_bytes);
                    st = pydetox::process_tensor(src.data(), src_type, rows, cols, native, dst_type, im, dst,
                                                 threads, verify);
                    const auto t0 = std::chrono::steady_clock::now();
                    pydetox::write_all(out_fd, dst, out_bytes, out_offset);
                    st.write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                }
                return py::tuple(py::make_tuple(py::none(), st));
            }
            U8 out(static_cast<py::ssize_t>(out_bytes));
            uint8_t* dst = out.mutable_data();
            {
                py::gil_scoped_release release;
                st = pydetox::process_tensor(src.data(), src_type, rows, cols, native, dst_type, im, dst, threads,
                                             verify);
            }
            return py::tuple(py::make_tuple(out, st));
        },
        py::arg("src"), py::arg("src_type"), py::arg("rows"), py::arg("cols"), py::arg("ops"), py::arg("dst_type"),
        py::arg("imatrix") = py::none(), py::arg("threads") = 1, py::arg("verify") = true, py::arg("out_fd") = -1,
        py::arg("out_offset") = 0);
}
