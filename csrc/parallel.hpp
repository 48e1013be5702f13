// A fork-join loop over [0, n) on a persistent pool of worker threads: contiguous ranges, one per thread,
// exceptions carried back to the caller. Ranges are equal and contiguous because every caller does the same work
// per item, and contiguous ranges keep results independent of the thread count. The workers are kept between
// calls: a model has hundreds of tensors and each goes through several parallel steps, and starting threads for
// each step cost more than some of the steps themselves.
#pragma once
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pydetox {

class ThreadPool {
  public:
    static ThreadPool& instance() {
        static ThreadPool pool;
        return pool;
    }

    // Runs job(i) for i in [0, count) with job(0) on the calling thread; returns when all are done.
    void run(int count, const std::function<void(int)>& job) {
        std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
        ensure_workers(count - 1);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = &job;
            pending_ = count - 1;
            ++generation_;
            active_ = count - 1;
        }
        cv_.notify_all();
        job(0);
        std::unique_lock<std::mutex> lock(mutex_);
        done_cv_.wait(lock, [&] { return pending_ == 0; });
        job_ = nullptr;
    }

    ~ThreadPool() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }

  private:
    void ensure_workers(int n) {
        while (static_cast<int>(workers_.size()) < n) {
            const int index = static_cast<int>(workers_.size()) + 1;
            workers_.emplace_back([this, index] { loop(index); });
        }
    }

    void loop(int index) {
        uint64_t seen = 0;
        for (;;) {
            const std::function<void(int)>* job;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
                if (index > active_) continue;  // this region needs fewer threads
                job = job_;
            }
            (*job)(index);
            std::lock_guard<std::mutex> lock(mutex_);
            if (--pending_ == 0) done_cv_.notify_one();
        }
    }

    std::mutex run_mutex_;
    std::mutex mutex_;
    std::condition_variable cv_, done_cv_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* job_ = nullptr;
    uint64_t generation_ = 0;
    int pending_ = 0;
    int active_ = 0;
    bool stop_ = false;
};

template <typename Fn>
void parallel_for(int64_t n, int nthreads, int64_t min_per_thread, Fn&& fn) {
    if (n <= 0) return;
    const int64_t max_threads = std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread));
    const int t = static_cast<int>(std::min<int64_t>(std::max(1, nthreads), max_threads));
    if (t == 1) {
        fn(int64_t{0}, n);
        return;
    }
    std::vector<std::exception_ptr> errors(t);
    const int64_t step = (n + t - 1) / t;
    ThreadPool::instance().run(t, [&](int i) {
        const int64_t b = i * step;
        const int64_t e = std::min(n, b + step);
        if (b >= e) return;
        try {
            fn(b, e);
        } catch (...) {
            errors[i] = std::current_exception();
        }
    });
    for (auto& err : errors) {
        if (err) std::rethrow_exception(err);
    }
}

}  // namespace pydetox
