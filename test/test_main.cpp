// The Catch2 runner of every xwin.cu test binary. After Catch2's own report it prints
// one plain line "<binary>: N passed, N failed" (counting test cases), which
// test/run_all.sh sums into the closing line of `make test`.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

static Catch::Totals g_totals;

struct TotalsListener : Catch::TestEventListenerBase {
    using TestEventListenerBase::TestEventListenerBase;
    void testRunEnded(Catch::TestRunStats const& stats) override { g_totals = stats.totals; }
};
CATCH_REGISTER_LISTENER(TotalsListener)

int main(int argc, char* argv[]) {
    int result = Catch::Session().run(argc, argv);
    const char* name = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    printf("%s: %zu passed, %zu failed\n", name, (size_t)g_totals.testCases.passed, (size_t)g_totals.testCases.failed);
    return result;
}
