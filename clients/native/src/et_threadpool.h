// ExecuTorch's threadpool (XNNPACK and some portable kernels run on it). The wheel ships threadpool.h but not the
// pthreadpool.h it includes; then the two exported members used here are declared on their own.
#pragma once

#if __has_include(<pthreadpool.h>)
#include <executorch/extension/threadpool/threadpool.h>
#else
#include <cstddef>
#include <cstdint>
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool
#endif
