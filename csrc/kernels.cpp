#include "kernels.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel.hpp"

namespace pydetox::kernels {
namespace {

// Rows per thread below which threading costs more than it saves.
constexpr int64_t kMinRows = 16;
// Columns per thread below which threading costs more than it saves.
constexpr int64_t kMinCols = 128;

}  // namespace

namespace {

// 16-float vectors through GCC's vector extension: one AVX-512 register, or two AVX2 registers where -march=native
// has no AVX-512. Loads and stores go through memcpy, so rows need no alignment.
constexpr int64_t VW = 16;
typedef float vf __attribute__((vector_size(VW * sizeof(float))));

inline vf vload(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VW; ++i) s += v[i];
    return s;
}

// D[r, j0 + jj] for R rows and J directions at once: R*J accumulators stay in registers while W and Vt stream.
template <int R, int J>
void dots_block(const float* W, int64_t cols, const float* Vt, int64_t j0, int64_t k, float* D) {
    vf acc[R][J];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) acc[r][j] = vf{};
    int64_t i = 0;
    for (; i + VW <= cols; i += VW) {
        vf w[R];
        for (int r = 0; r < R; ++r) w[r] = vload(W + r * cols + i);
        for (int j = 0; j < J; ++j) {
            const vf v = vload(Vt + (j0 + j) * cols + i);
            for (int r = 0; r < R; ++r) acc[r][j] += w[r] * v;
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int j = 0; j < J; ++j) {
            float s = hsum(acc[r][j]);
            for (int64_t t = i; t < cols; ++t) s += W[r * cols + t] * Vt[(j0 + j) * cols + t];
            D[r * k + j0 + j] = s;
        }
    }
}

template <int R>
void dots_rows(const float* W, int64_t cols, const float* Vt, int64_t k, float* D) {
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) dots_block<R, 4>(W, cols, Vt, j, k, D);
    for (; j < k; ++j) dots_block<R, 1>(W, cols, Vt, j, k, D);
}

// W[r, :] += sum_j coef[r, j] Vt[j, :] for R rows: each element of W is loaded and stored once.
template <int R>
void update_rows(float* W, int64_t cols, const float* coef, const float* Vt, int64_t k) {
    int64_t i = 0;
    for (; i + VW <= cols; i += VW) {
        vf acc[R];
        for (int r = 0; r < R; ++r) acc[r] = vload(W + r * cols + i);
        for (int64_t j = 0; j < k; ++j) {
            const vf v = vload(Vt + j * cols + i);
            for (int r = 0; r < R; ++r) acc[r] += splat(coef[r * k + j]) * v;
        }
        for (int r = 0; r < R; ++r) vstore(W + r * cols + i, acc[r]);
    }
    for (; i < cols; ++i) {
        for (int r = 0; r < R; ++r) {
            float a = W[r * cols + i];
            for (int64_t j = 0; j < k; ++j) a += coef[r * k + j] * Vt[j * cols + i];
            W[r * cols + i] = a;
        }
    }
}

// C[j0 + jj, c] += sum_{r in [r0, r1)} B[j0 + jj, r] W[r, c] for c in [c0, c1): J column vectors of C stay in
// registers while a block of rows of W streams past.
template <int J>
void gram_block(const float* W, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                const float* B, int64_t j0, float* C) {
    int64_t i = c0;
    for (; i + VW <= c1; i += VW) {
        vf acc[J];
        for (int j = 0; j < J; ++j) acc[j] = vload(C + (j0 + j) * cols + i);
        for (int64_t r = r0; r < r1; ++r) {
            const vf w = vload(W + r * cols + i);
            for (int j = 0; j < J; ++j) acc[j] += splat(B[(j0 + j) * rows + r]) * w;
        }
        for (int j = 0; j < J; ++j) vstore(C + (j0 + j) * cols + i, acc[j]);
    }
    for (; i < c1; ++i) {
        for (int j = 0; j < J; ++j) {
            float a = C[(j0 + j) * cols + i];
            for (int64_t r = r0; r < r1; ++r) a += B[(j0 + j) * rows + r] * W[r * cols + i];
            C[(j0 + j) * cols + i] = a;
        }
    }
}

}  // namespace

void row_dots(const float* W, int64_t r0, int64_t r1, int64_t cols, const float* Vt, int64_t k, float* D) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) dots_rows<4>(W + r * cols, cols, Vt, k, D + (r - r0) * k);
    for (; r < r1; ++r) dots_rows<1>(W + r * cols, cols, Vt, k, D + (r - r0) * k);
}

void row_update(float* W, int64_t r0, int64_t r1, int64_t cols, const float* coef, const float* Vt, int64_t k) {
    int64_t r = r0;
    for (; r + 8 <= r1; r += 8) update_rows<8>(W + r * cols, cols, coef + (r - r0) * k, Vt, k);
    for (; r < r1; ++r) update_rows<1>(W + r * cols, cols, coef + (r - r0) * k, Vt, k);
}

void col_gram(const float* W, int64_t rows, int64_t cols, int64_t c0, int64_t c1, const float* B, int64_t k,
              float* C) {
    for (int64_t j = 0; j < k; ++j) std::fill(C + j * cols + c0, C + j * cols + c1, 0.f);
    // Row blocks small enough that a block's slice of W stays in L2 while each group of directions passes over it.
    constexpr int64_t kRowBlock = 32;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        const int64_t r1 = std::min(rows, r0 + kRowBlock);
        int64_t j = 0;
        for (; j + 8 <= k; j += 8) gram_block<8>(W, rows, cols, r0, r1, c0, c1, B, j, C);
        for (; j < k; ++j) gram_block<1>(W, rows, cols, r0, r1, c0, c1, B, j, C);
    }
}

void gram_in(const float* W, int64_t rows, int64_t cols, const float* Vt, int64_t k, float* D, int nthreads) {
    parallel_for(rows, nthreads, kMinRows, [&](int64_t b, int64_t e) { row_dots(W, b, e, cols, Vt, k, D + b * k); });
}

void gram_out(const float* W, int64_t rows, int64_t cols, const float* U, int64_t k, float* C, int nthreads) {
    // Columns are split over threads so each thread owns its slice of C: no reduction, and the result does not
    // depend on the thread count.
    // Threads split whole vectors of columns, so a column takes the vector or the scalar-tail path by its own
    // index, never by where a thread's range happens to end.
    const int64_t nvec = (cols + VW - 1) / VW;
    parallel_for(nvec, nthreads, kMinCols / VW, [&](int64_t b, int64_t e) {
        col_gram(W, rows, cols, b * VW, std::min(cols, e * VW), U, k, C);
    });
}

void project_in(float* W, int64_t rows, int64_t cols, const float* Vt, int64_t k, const float* gain, int nthreads) {
    parallel_for(rows, nthreads, kMinRows, [&](int64_t b, int64_t e) {
        constexpr int64_t kBlock = 64;  // rows per step: keeps the coefficient block small and in cache
        std::vector<float> d(static_cast<size_t>(kBlock * k));
        for (int64_t r0 = b; r0 < e; r0 += kBlock) {
            const int64_t r1 = std::min(e, r0 + kBlock);
            row_dots(W, r0, r1, cols, Vt, k, d.data());
            for (int64_t r = 0; r < r1 - r0; ++r) {
                for (int64_t j = 0; j < k; ++j) d[r * k + j] *= gain ? gain[j] - 1.f : -1.f;
            }
            row_update(W, r0, r1, cols, d.data(), Vt, k);
        }
    });
}

void project_out(float* W, int64_t rows, int64_t cols, const float* U, int64_t k, const float* gain, int nthreads) {
    std::vector<float> C(static_cast<size_t>(k * cols));
    gram_out(W, rows, cols, U, k, C.data(), nthreads);
    parallel_for(rows, nthreads, kMinRows, [&](int64_t b, int64_t e) {
        std::vector<float> coef(static_cast<size_t>((e - b) * k));
        for (int64_t r = b; r < e; ++r) {
            for (int64_t j = 0; j < k; ++j) coef[(r - b) * k + j] = U[j * rows + r] * (gain ? gain[j] - 1.f : -1.f);
        }
        row_update(W, b, e, cols, coef.data(), C.data(), k);
    });
}

void low_rank(float* W, int64_t rows, int64_t cols, const float* L, const float* R, int64_t k, int nthreads) {
    parallel_for(rows, nthreads, kMinRows, [&](int64_t b, int64_t e) {
        std::vector<float> coef(static_cast<size_t>((e - b) * k));
        for (int64_t r = b; r < e; ++r) {
            for (int64_t j = 0; j < k; ++j) coef[(r - b) * k + j] = L[j * rows + r];
        }
        row_update(W, b, e, cols, coef.data(), R, k);
    });
}

void scale_rows(float* W, int64_t rows, int64_t cols, const float* s, int nthreads) {
    parallel_for(rows, nthreads, kMinRows, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
            float* w = W + r * cols;
            const float a = s[r];
#pragma omp simd
            for (int64_t i = 0; i < cols; ++i) w[i] *= a;
        }
    });
}

void add_rows(float* W, int64_t rows, int64_t cols, const float* idx, const float* D, int64_t k, int nthreads) {
    (void)rows;
    parallel_for(k, nthreads, kMinRows, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) {
            float* w = W + static_cast<int64_t>(idx[j]) * cols;
            const float* d = D + j * cols;
#pragma omp simd
            for (int64_t i = 0; i < cols; ++i) w[i] += d[i];
        }
    });
}

void scale_cols(float* W, int64_t rows, int64_t cols, const float* s, int nthreads) {
    parallel_for(rows, nthreads, kMinRows, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
            float* w = W + r * cols;
#pragma omp simd
            for (int64_t i = 0; i < cols; ++i) w[i] *= s[i];
        }
    });
}

}  // namespace pydetox::kernels
