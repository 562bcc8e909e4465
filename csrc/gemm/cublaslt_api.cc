// Run-time loading of libcublasLt (see cublaslt_api.h).
#include "gemm/cublaslt_api.h"

#include <dlfcn.h>

#include <mutex>

namespace baracuda::lt {
namespace {

std::mutex mu;
Api loaded{};
const Api* found = nullptr;

template <class F>
bool symbol(void* lib, const char* name, F& fn, std::string* missing) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (fn == nullptr) *missing = name;
  return fn != nullptr;
}

bool bind(void* lib, Api& api, std::string* missing) {
  size_t (*get_version)() = nullptr;
  const bool ok = symbol(lib, "cublasLtGetVersion", get_version, missing) &&
                  symbol(lib, "cublasLtCreate", api.create, missing) &&
                  symbol(lib, "cublasLtMatmulDescCreate", api.desc_create, missing) &&
                  symbol(lib, "cublasLtMatmulDescDestroy", api.desc_destroy, missing) &&
                  symbol(lib, "cublasLtMatmulDescSetAttribute", api.desc_set, missing) &&
                  symbol(lib, "cublasLtMatrixLayoutCreate", api.layout_create, missing) &&
                  symbol(lib, "cublasLtMatrixLayoutDestroy", api.layout_destroy, missing) &&
                  symbol(lib, "cublasLtMatmulPreferenceCreate", api.preference_create, missing) &&
                  symbol(lib, "cublasLtMatmulPreferenceDestroy", api.preference_destroy, missing) &&
                  symbol(lib, "cublasLtMatmulPreferenceSetAttribute", api.preference_set, missing) &&
                  symbol(lib, "cublasLtMatmulAlgoGetHeuristic", api.heuristic, missing) &&
                  symbol(lib, "cublasLtMatmul", api.matmul, missing);
  if (ok) api.version = get_version();
  return ok;
}

}  // namespace

const Api* load(const std::vector<std::string>& candidates, std::string* error) {
  std::lock_guard<std::mutex> lock(mu);
  if (found != nullptr) return found;
  error->clear();
  for (const std::string& name : candidates) {
    // RTLD_LOCAL: our symbols stay ours; a library XLA already loaded is shared, not loaded twice.
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      *error += std::string("\n  ") + dlerror();
      continue;
    }
    std::string missing;
    if (bind(lib, loaded, &missing)) return found = &loaded;
    *error += "\n  " + name + " lacks " + missing;
    dlclose(lib);
  }
  return nullptr;
}

const Api* api() {
  std::lock_guard<std::mutex> lock(mu);
  return found;
}

}  // namespace baracuda::lt
