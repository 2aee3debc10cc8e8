// Fixture access for the tests: the tensor archives that dev/make_fixtures.py writes
// (format documented in llm.cu, next to archive_load).
#pragma once
#include <sys/wait.h>

#include <catch2/catch.hpp>

#include <map>
#include <string>

#include "../llm.cu"

struct FixtureTensor {
    std::vector<uint64_t> shape;
    std::vector<float> data;
};

inline std::map<std::string, FixtureTensor> fixture_load(const std::string& path) {
    std::map<std::string, FixtureTensor> out;
    for (ArchiveEntry& e : archive_load(path.c_str())) out[e.name] = FixtureTensor{e.shape, std::move(e.data)};
    return out;
}

// Runs a shell command; returns its exit status and puts its stdout and stderr in *output.
inline int run_command(const std::string& cmd, std::string* output) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) return -1;
    char buf[4096];
    size_t got;
    output->clear();
    while ((got = fread(buf, 1, sizeof(buf), p)) > 0) output->append(buf, got);
    int status = pclose(p);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The central difference (loss(x + h e_i) - loss(x - h e_i)) / 2h in element i of x (float or
// double; x[i] is restored), the finite-difference tests' one quotient
template <typename T, typename F>
double central_difference(T* x, size_t i, double h, F&& loss) {
    T saved = x[i];
    x[i] = (T)(saved + h);
    double up = loss();
    x[i] = (T)(saved - h);
    double down = loss();
    x[i] = saved;
    return (up - down) / (2 * h);
}

// ||a - b|| / ||b||, accumulated in double
inline double relative_error(const float* a, const float* b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return std::sqrt(num) / (std::sqrt(den) + 1e-30);
}

// A runner's parameter gradients on the host (the GPU build's copied down)
inline std::vector<float> runner_gradients(Runner* r) {
    std::vector<float> grads(r->host.num_params);
#ifdef XWIN_CUDA
    cudaCheck(cudaMemcpy(grads.data(), r->gpu.grads_memory, grads.size() * sizeof(float), cudaMemcpyDeviceToHost));
#else
    memcpy(grads.data(), r->host.grads_memory, grads.size() * sizeof(float));
#endif
    return grads;
}

// ||a - b|| / ||b|| of each parameter tensor of a flat buffer (file order, as point_parameters
// lays it) against the fixture's "<prefix><name>" tensors, each under tol
inline void check_param_tensors(const LlamaConfig& c, const float* flat, std::map<std::string, FixtureTensor>& expect, const std::string& prefix,
                                double tol) {
    size_t sizes[NUM_PARAM_TENSORS], offset = 0;
    param_sizes(c, sizes);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        if (sizes[i] == 0) continue;
        std::string key = prefix + PARAM_NAMES[i];
        REQUIRE(expect.count(key) == 1);
        REQUIRE(expect[key].data.size() == sizes[i]);
        double err = relative_error(flat + offset, expect[key].data.data(), sizes[i]);
        printf("  %-22s rel err %.2e\n", key.c_str(), err);
        INFO(key << " relative error " << err << " (tolerance " << tol << ")");
        CHECK(err < tol);
        offset += sizes[i];
    }
}

// the bytes of a hex string ("-" stands for the empty string), as the text fixtures store them
inline std::string hex_decode(const std::string& s) {
    if (s == "-") return "";
    if (s.size() % 2 != 0) fail_file("fixture", "hex string of odd length %zu", s.size());
    std::string out;
    for (size_t i = 0; i < s.size(); i += 2) out.push_back((char)std::stoi(s.substr(i, 2), nullptr, 16));
    return out;
}
