// A minimal fork-join loop over [0, n): contiguous ranges, one per thread, exceptions carried back to the caller.
// Work is split into equal contiguous ranges because every caller here does the same work per row, and contiguous
// ranges keep the result independent of the thread count (each row is computed by exactly the same code).
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace pydetox {

template <typename Fn>
void parallel_for(int64_t n, int nthreads, int64_t min_per_thread, Fn&& fn) {
    if (n <= 0) return;
    int64_t max_threads = std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread));
    int t = static_cast<int>(std::min<int64_t>(std::max(1, nthreads), max_threads));
    if (t == 1) {
        fn(int64_t{0}, n);
        return;
    }
    std::vector<std::thread> workers;
    std::vector<std::exception_ptr> errors(t);
    workers.reserve(t - 1);
    const int64_t step = (n + t - 1) / t;
    auto run = [&](int i) {
        const int64_t b = i * step;
        const int64_t e = std::min(n, b + step);
        if (b >= e) return;
        try {
            fn(b, e);
        } catch (...) {
            errors[i] = std::current_exception();
        }
    };
    for (int i = 1; i < t; ++i) workers.emplace_back(run, i);
    run(0);
    for (auto& w : workers) w.join();
    for (auto& err : errors) {
        if (err) std::rethrow_exception(err);
    }
}

}  // namespace pydetox
