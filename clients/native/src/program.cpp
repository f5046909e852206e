#include "program.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <stdexcept>

#include "et_threadpool.h"
#include <executorch/runtime/core/data_loader.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

namespace fedprge {

namespace et = ::executorch::runtime;
using ::executorch::aten::ScalarType;
using ::executorch::aten::Tensor;
using ::executorch::aten::TensorImpl;

namespace {

// The whole .pte mapped read-only; segments are views into it (weights stay file-backed pages).
class MmapLoader final : public et::DataLoader {
 public:
  explicit MmapLoader(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw std::runtime_error("ExecuTorch program '" + path + "' does not exist or cannot be read");
    struct stat st {};
    ::fstat(fd, &st);
    size_ = size_t(st.st_size);
    data_ = size_ ? ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    ::close(fd);
    if (data_ == MAP_FAILED) throw std::runtime_error("cannot map ExecuTorch program '" + path + "'");
  }
  ~MmapLoader() override {
    if (data_ && data_ != MAP_FAILED) ::munmap(data_, size_);
  }
  et::Result<et::FreeableBuffer> load(size_t offset, size_t size, const SegmentInfo&) const override {
    if (offset + size > size_) return et::Error::InvalidArgument;
    return et::FreeableBuffer(static_cast<const uint8_t*>(data_) + offset, size, nullptr);
  }
  et::Result<size_t> size() const override { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// A MemoryAllocator that grows on demand (the method's bookkeeping and a delegate's scratch sizes are not known
// before loading); reset() frees everything.
class GrowingAllocator final : public et::MemoryAllocator {
 public:
  GrowingAllocator() : et::MemoryAllocator(0, nullptr) {}
  ~GrowingAllocator() override { reset(); }
  void* allocate(size_t size, size_t alignment) override {
    void* p = nullptr;
    if (::posix_memalign(&p, alignment < sizeof(void*) ? sizeof(void*) : alignment, size ? size : 1) != 0) return nullptr;
    blocks_.push_back(p);
    return p;
  }
  void reset() override {
    for (void* p : blocks_) std::free(p);
    blocks_.clear();
  }

 private:
  std::vector<void*> blocks_;
};

// An input tensor over caller-owned data, contiguous.
struct Input {
  std::vector<TensorImpl::SizesType> sizes;
  std::vector<TensorImpl::DimOrderType> order;
  std::vector<TensorImpl::StridesType> strides;
  std::unique_ptr<TensorImpl> impl;
  Input(ScalarType type, std::vector<TensorImpl::SizesType> shape, void* data) : sizes(std::move(shape)) {
    size_t dim = sizes.size();
    order.resize(dim);
    strides.resize(dim);
    TensorImpl::StridesType s = 1;
    for (size_t i = dim; i-- > 0;) {
      order[i] = TensorImpl::DimOrderType(i);
      strides[i] = s;
      s *= sizes[i];
    }
    impl = std::make_unique<TensorImpl>(type, ssize_t(dim), sizes.data(), data, order.data(), strides.data());
  }
  et::EValue value() { return et::EValue(Tensor(impl.get())); }
};

std::string error_name(et::Error e) { return std::to_string(int(e)); }

}  // namespace

struct Program::Impl {
  std::unique_ptr<MmapLoader> loader;
  std::unique_ptr<et::Program> program;
  // the loaded method (one at a time) and its memory
  std::string name;
  std::vector<std::vector<uint8_t>> planned;
  std::vector<et::Span<uint8_t>> spans;
  std::unique_ptr<et::HierarchicalAllocator> planned_allocator;
  GrowingAllocator method_allocator, temp_allocator;
  std::unique_ptr<et::MemoryManager> memory;
  std::unique_ptr<et::Method> method;

  int threads = 0;  // size of ExecuTorch's threadpool, set when the first method loads (0: its default)

  et::Method& load(const std::string& method_name, const std::string& path) {
    if (method && name == method_name) return *method;
    if (threads > 0) {
      auto* pool = ::executorch::extension::threadpool::get_threadpool();
      if (pool && pool->get_thread_count() != size_t(threads)) pool->_unsafe_reset_threadpool(uint32_t(threads));
      threads = 0;
    }
    method.reset();
    memory.reset();
    planned_allocator.reset();
    method_allocator.reset();
    temp_allocator.reset();
    auto meta = program->method_meta(method_name.c_str());
    if (!meta.ok()) throw std::runtime_error("'" + path + "' has no method '" + method_name + "'");
    planned.clear();
    spans.clear();
    for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
      planned.emplace_back(size_t(meta->memory_planned_buffer_size(i).get()));
    }
    for (auto& buf : planned) spans.emplace_back(buf.data(), buf.size());
    planned_allocator = std::make_unique<et::HierarchicalAllocator>(et::Span<et::Span<uint8_t>>(spans.data(), spans.size()));
    memory = std::make_unique<et::MemoryManager>(&method_allocator, planned_allocator.get(), &temp_allocator);
    auto m = program->load_method(method_name.c_str(), memory.get());
    if (!m.ok()) {
      throw std::runtime_error("cannot load method '" + method_name + "' of '" + path + "' (ExecuTorch error " +
                               error_name(m.error()) + "; a backend this runtime lacks?)");
    }
    method = std::make_unique<et::Method>(std::move(m.get()));
    name = method_name;
    return *method;
  }

  void run(et::Method& m, std::vector<Input>& inputs, const std::string& what) {
    for (size_t i = 0; i < inputs.size(); ++i) {
      et::Error e = m.set_input(inputs[i].value(), i);
      if (e != et::Error::Ok) throw std::runtime_error(what + ": input " + std::to_string(i) + " refused (error " + error_name(e) + ")");
    }
    et::Error e = m.execute();
    if (e != et::Error::Ok) throw std::runtime_error(what + ": execution failed (ExecuTorch error " + error_name(e) + ")");
    temp_allocator.reset();
  }
};

Program::Program(const std::string& path, int threads) : impl_(std::make_unique<Impl>()), path_(path) {
  et::runtime_init();
  impl_->threads = threads;
  impl_->loader = std::make_unique<MmapLoader>(path);
  auto program = et::Program::load(impl_->loader.get(), et::Program::Verification::Minimal);
  if (!program.ok()) throw std::runtime_error("'" + path + "' is not an ExecuTorch program (error " + error_name(program.error()) + ")");
  impl_->program = std::make_unique<et::Program>(std::move(program.get()));
  for (const char* m : {"forward", "nll", "directions"}) {
    if (!impl_->program->method_meta(m).ok()) {
      throw std::runtime_error("'" + path + "' lacks method '" + m +
                               "'; a P-RGE program needs forward, nll and directions (re-export it with python -m fedprge.export)");
    }
  }
  auto meta = impl_->program->method_meta("forward");
  auto ids = meta->input_tensor_meta(0), seeds = meta->input_tensor_meta(3), b = meta->input_tensor_meta(4);
  if (meta->num_inputs() != 5 || !ids.ok() || !seeds.ok() || !b.ok() || ids->sizes().size() != 2) {
    throw std::runtime_error("'" + path + "': forward does not take (input_ids, attention_mask, labels, seeds, b)");
  }
  batch_size_ = ids->sizes()[0];
  seq_len_ = ids->sizes()[1];
  q_ = seeds->sizes()[0];
  num_params_ = b->sizes()[0];
}

Program::~Program() = default;

std::vector<float> Program::losses(const Batch& batch, const std::vector<uint32_t>& seeds, const std::vector<float>& b) {
  et::Method& m = impl_->load("forward", path_);
  std::vector<int64_t> s(seeds.begin(), seeds.end());
  auto ids = const_cast<int64_t*>(batch.ids.data()), mask = const_cast<int64_t*>(batch.mask.data()),
       labels = const_cast<int64_t*>(batch.labels.data());
  TensorImpl::SizesType bs = TensorImpl::SizesType(batch_size_), t = TensorImpl::SizesType(seq_len_);
  std::vector<Input> in;
  in.emplace_back(ScalarType::Long, std::vector<TensorImpl::SizesType>{bs, t}, ids);
  in.emplace_back(ScalarType::Long, std::vector<TensorImpl::SizesType>{bs, t}, mask);
  in.emplace_back(ScalarType::Long, std::vector<TensorImpl::SizesType>{bs, t}, labels);
  in.emplace_back(ScalarType::Long, std::vector<TensorImpl::SizesType>{TensorImpl::SizesType(q_)}, s.data());
  in.emplace_back(ScalarType::Float, std::vector<TensorImpl::SizesType>{TensorImpl::SizesType(num_params_)},
                  const_cast<float*>(b.data()));
  impl_->run(m, in, "forward");
  const Tensor out = m.get_output(0).toTensor();
  const float* p = out.const_data_ptr<float>();
  return std::vector<float>(p, p + out.numel());
}

void Program::nll(const Batch& batch, const std::vector<float>& b, std::vector<float>& sums, std::vector<int64_t>& counts) {
  et::Method& m = impl_->load("nll", path_);
  TensorImpl::SizesType bs = TensorImpl::SizesType(batch_size_), t = TensorImpl::SizesType(seq_len_);
  std::vector<Input> in;
  in.emplace_back(ScalarType::Long, std::vector<TensorImpl::SizesType>{bs, t}, const_cast<int64_t*>(batch.ids.data()));
  in.emplace_back(ScalarType::Long, std::vector<TensorImpl::SizesType>{bs, t}, const_cast<int64_t*>(batch.mask.data()));
  in.emplace_back(ScalarType::Long, std::vector<TensorImpl::SizesType>{bs, t}, const_cast<int64_t*>(batch.labels.data()));
  in.emplace_back(ScalarType::Float, std::vector<TensorImpl::SizesType>{TensorImpl::SizesType(num_params_)},
                  const_cast<float*>(b.data()));
  impl_->run(m, in, "nll");
  const Tensor s = m.get_output(0).toTensor(), c = m.get_output(1).toTensor();
  sums.assign(s.const_data_ptr<float>(), s.const_data_ptr<float>() + s.numel());
  counts.assign(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
}

std::vector<float> Program::directions(const std::vector<uint32_t>& seeds) {
  et::Method& m = impl_->load("directions", path_);
  std::vector<int64_t> s(seeds.begin(), seeds.end());
  std::vector<Input> in;
  in.emplace_back(ScalarType::Long, std::vector<TensorImpl::SizesType>{TensorImpl::SizesType(q_)}, s.data());
  impl_->run(m, in, "directions");
  const Tensor out = m.get_output(0).toTensor();
  return std::vector<float>(out.const_data_ptr<float>(), out.const_data_ptr<float>() + out.numel());
}

}  // namespace fedprge
