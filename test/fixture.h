// Fixture access for the tests: the tensor archives that dev/make_fixtures.py writes
// (format documented in llm.cu, next to archive_load).
#pragma once
#include <sys/wait.h>

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

// the bytes of a hex string ("-" stands for the empty string), as the text fixtures store them
inline std::string hex_decode(const std::string& s) {
    if (s == "-") return "";
    if (s.size() % 2 != 0) fail_file("fixture", "hex string of odd length %zu", s.size());
    std::string out;
    for (size_t i = 0; i < s.size(); i += 2) out.push_back((char)std::stoi(s.substr(i, 2), nullptr, 16));
    return out;
}
