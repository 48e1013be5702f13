// One tensor through the edit pipeline: dequantize with libggml, apply a list of edits, requantize with libggml,
// and measure how much of each edit survived the requantization.
#pragma once
#include <cstdint>
#include <vector>

#include "ggml_api.hpp"

namespace pydetox {

enum class OpKind : int { ProjectOut = 0, ProjectIn = 1, LowRank = 2, ScaleRows = 3, ScaleCols = 4, AddRows = 5 };

// Pointers stay owned by the caller. Layouts (W is rows x cols):
//   ProjectOut: a = basis, k x rows; gain = k values or null (0 = remove, g = keep that share).
//   ProjectIn:  a = basis, k x cols; gain as above.
//   LowRank:    a = L, k x rows; b = R, k x cols; W += L^T R.
//   ScaleRows:  a = rows values.   ScaleCols: a = cols values.
//   AddRows:    a = k row numbers (whole floats, unique, < rows); b = D, k x cols; W[a[j], :] += D[j, :].
struct Op {
    OpKind kind;
    const float* a = nullptr;
    const float* b = nullptr;
    const float* gain = nullptr;
    int64_t k = 0;
};

// For a projection: removed = ||(1 - g) P W0||, the part the edit takes away; survived = ||P W' - g P W0|| with W'
// the edited tensor in float (survived_f32) and after requantization (survived). P W means the basis coordinates
// of W. survived / removed is the share of the removed component that is still there.
struct OpStats {
    double removed = 0.0;
    double survived_f32 = 0.0;
    double survived = 0.0;
};

struct TensorStats {
    double dequantize_s = 0.0;
    double edit_s = 0.0;
    double quantize_s = 0.0;
    double verify_s = 0.0;
    double write_s = 0.0;  // filled in by the caller that writes the result
    double norm_orig = 0.0;       // ||W0||, the dequantized input
    double norm_delta = 0.0;      // ||W_edit - W0||, the edit in float (with verify)
    double norm_edited = 0.0;     // ||W_edit||, whenever there are edits
    double norm_quant_err = 0.0;  // ||Q(W_edit) - W_edit||, what requantization changed
    std::vector<OpStats> ops;     // one per op; zeros for ops that are not projections
};

// Throws pydetox::Error when `type` cannot be the destination of ggml_quantize_chunk.
void check_quantizable(ggml::Type type, int64_t cols);

void dequantize(const void* src, ggml::Type type, int64_t rows, int64_t cols, float* dst, int nthreads);
void quantize(const float* src, ggml::Type type, int64_t rows, int64_t cols, const float* imatrix, void* dst,
              int nthreads);
void apply_ops(float* W, int64_t rows, int64_t cols, const std::vector<Op>& ops, int nthreads);

// src holds rows * row_bytes(src_type, cols) bytes; dst must hold rows * row_bytes(dst_type, cols).
// `imatrix` (cols values or null) is passed to the quantizer. With verify, the stats are filled in.
TensorStats process_tensor(const void* src, ggml::Type src_type, int64_t rows, int64_t cols,
                           const std::vector<Op>& ops, ggml::Type dst_type, const float* imatrix, void* dst,
                           int nthreads, bool verify);

// Writes n bytes at `offset` of file descriptor `fd` (pwrite until done); throws IoError naming errno's message.
void write_all(int fd, const void* data, size_t n, int64_t offset);

// Scratch memory kept between calls (per calling thread), so a model's worth of tensors does not pay fresh page
// faults for every buffer; `release_workspace` returns it.
uint8_t* output_workspace(size_t n);
void release_workspace();

}  // namespace pydetox
