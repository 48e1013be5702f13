// Dense float32 kernels for weight edits. A matrix W is `rows x cols`, row-major (a GGUF tensor with
// ne = [cols, rows]; torch's nn.Linear weight (out, in) has the same layout). A basis is `k x n`, one direction per
// row. All functions work in place on W and split rows (or columns) over `nthreads` threads; none allocates more
// than O(k * (rows + cols)) floats.
#pragma once
#include <cstdint>

namespace pydetox::kernels {

// D[r, j] = sum_i W[r, i] * Vt[j, i] for rows r in [r0, r1); D is (r1 - r0) x k.
void row_dots(const float* W, int64_t r0, int64_t r1, int64_t cols, const float* Vt, int64_t k, float* D);

// W[r, :] += sum_j coef[(r - r0) * k + j] * Vt[j, :] for rows r in [r0, r1).
void row_update(float* W, int64_t r0, int64_t r1, int64_t cols, const float* coef, const float* Vt, int64_t k);

// C[j, c] = sum_r B[j, r] * W[r, c] for columns c in [c0, c1); C is k x cols (only those columns written).
void col_gram(const float* W, int64_t rows, int64_t cols, int64_t c0, int64_t c1, const float* B, int64_t k, float* C);

// Input-side projection: W <- W (I - Vt^T diag(1 - g) Vt). With g = 0 this removes span(Vt) from every row;
// 0 < g < 1 damps it (EigenShift-style spectral damping). `gain` may be null (all zeros).
void project_in(float* W, int64_t rows, int64_t cols, const float* Vt, int64_t k, const float* gain, int nthreads);

// Output-side projection: W <- (I - U^T diag(1 - g) U) W, U is k x rows.
void project_out(float* W, int64_t rows, int64_t cols, const float* U, int64_t k, const float* gain, int nthreads);

// Low-rank update: W <- W + L^T R, with L k x rows and R k x cols (k rank-one terms).
void low_rank(float* W, int64_t rows, int64_t cols, const float* L, const float* R, int64_t k, int nthreads);

// W[r, :] *= s[r].
void scale_rows(float* W, int64_t rows, int64_t cols, const float* s, int nthreads);

// W[idx[j], :] += D[j, :] for j < k: learned changes to a few rows (an output layer's rows for chosen tokens).
// idx holds row numbers as floats (exact below 2^24); the caller checks they are whole, in range and unique.
void add_rows(float* W, int64_t rows, int64_t cols, const float* idx, const float* D, int64_t k, int nthreads);

// W[:, c] *= s[c].
void scale_cols(float* W, int64_t rows, int64_t cols, const float* s, int nthreads);

// Projections of W onto a basis, for measuring what an edit left: out-side C = U W (k x cols, written to C),
// in-side D = W Vt^T (rows x k, written to D).
void gram_out(const float* W, int64_t rows, int64_t cols, const float* U, int64_t k, float* C, int nthreads);
void gram_in(const float* W, int64_t rows, int64_t cols, const float* Vt, int64_t k, float* D, int nthreads);

}  // namespace pydetox::kernels
