// Data parallel training (llm.cu's collectives, the Trainer's ranks) through the stage programs
// run by Debian's OpenMPI mpirun with 2 ranks on this machine: the ranks of train_sft, train_rm
// and train_dpo train what one rank trains with as many micro-batches accumulated, rank 0 alone
// prints and writes the weights (with ZeRO-1 each rank writes its own shard of the moments), a
// 2-rank run resumes bit-identically, a checkpoint resumes only on its number of ranks (another
// with -F 1), a damaged shard file is refused, and a build without MPI refuses a world > 1. The binaries are
// build/<program>_cpu (with MPI) and build/train_sft_emu (the CUDA build over the emulation
// layer, without MPI).
//
// What can be equal, and what is compared: a step's gradient is the sum of its micro-batches'
// gradients. One rank accumulates them in place (the parameter gradients take +=), so the
// embedding's rows, which take one += per token and one from the tied head in every
// micro-batch, are rounded differently from the sum of two ranks' gradients, each from zero.
// Bit-equal results across rank counts would need a per-micro-batch gradient buffer on one
// rank, changing every single-rank run's bits. So the comparison holds to rounding: the first
// step's loss is equal (the same weights, the same micro-batches, their sums added in the same
// order), later losses to 1e-5 relative and every final weight to 1e-6 absolute (measured
// here: 2.4e-8 after 6 steps, 5.2e-8 against 1 rank x 4; the run moves weights by 0.03, so a
// wrong split of the rows fails).
#include <catch2/catch.hpp>

#include <functional>
#include <thread>

#include "program.h"

// mpirun with 2 ranks on this machine: oversubscribed (2 ranks may exceed the cores), as root
// through OpenMPI's documented variables, one OpenMP thread per rank, no core binding. Fails
// the test (it never skips) when Debian's mpirun is missing.
static std::string mpirun2() {
    std::string out;
    if (run("command -v mpirun", &out) != 0) {
        FAIL("mpirun is missing: install Debian's OpenMPI with: sudo apt-get install openmpi-bin libopenmpi-dev (make test installs it when root)");
    }
    return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 mpirun --oversubscribe --bind-to none -np 2 ";
}

// occurrences of what in text
static size_t count_of(const std::string& text, const std::string& what) {
    size_t n = 0;
    for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) n++;
    return n;
}

static std::vector<float> model_weights(const std::string& path) {
    Llama m;
    llama_load(&m, path.c_str());
    std::vector<float> w(m.params_memory, m.params_memory + m.num_params);
    llama_free(&m);
    return w;
}

static double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double d = 0;
    for (size_t i = 0; i < a.size(); i++) d = std::max(d, std::fabs((double)a[i] - b[i]));
    return d;
}

static void check_close(const std::vector<double>& a, const std::vector<double>& b, double rel) {
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); i++) {
        INFO("value " << i << ": " << a[i] << " against " << b[i]);
        CHECK(std::fabs(a[i] - b[i]) <= rel * std::fabs(b[i]));
    }
}

// Two runs that trained the same bits: model.bin byte for byte (and not empty), and every
// logged value of `keys` (the step losses by default) equal
static void check_same_run(const std::string& a, const std::string& b, std::vector<const char*> keys = {"loss"}) {
    std::vector<unsigned char> model = file_bytes(b + "/model.bin");
    REQUIRE(!model.empty());
    CHECK(file_bytes(a + "/model.bin") == model);
    for (const char* key : keys) {
        INFO(key);
        CHECK(logged_values(a + "/log.jsonl", key) == logged_values(b + "/log.jsonl", key));
    }
}

// Two runs that trained the same rows with their sums added in another order: the first step's
// loss equal (the same weights, the same rows), the later ones to loss_rel relative, every final
// weight to weight_tol; prints the largest weight difference
static void check_same_to_rounding(const std::string& a, const std::string& b, double loss_rel, double weight_tol, const char* what) {
    std::vector<double> la = logged_losses(a + "/log.jsonl"), lb = logged_losses(b + "/log.jsonl");
    REQUIRE(la.size() >= 2);
    REQUIRE(la.size() == lb.size());
    CHECK(la[0] == lb[0]);
    check_close(la, lb, loss_rel);
    double d = max_abs_diff(model_weights(a + "/model.bin"), model_weights(b + "/model.bin"));
    printf("%s: max |weight difference| %.3g\n", what, d);
    CHECK(d <= weight_tol);
}

// A small model on 20 sequences (epochs roll over inside steps 3 and 5), 8 validation ones.
struct ParallelFixture {
    std::string model = write_small_model("parallel_model.bin"), data = write_small_data("parallel.tok", 20),
                val = write_small_data("parallel_val.tok", 8);
    std::string common = " -e " + model + " -i " + data + " -j " + val + " -p '' -x 6 -u 2 -l 1e-2 -v 3 -s 0 -n 0 -S 5";
    std::vector<std::string> dirs;
    std::string dir(const char* name) {
        dirs.push_back(scratch(name));
        rm_rf(dirs.back());
        return dirs.back();
    }
    ~ParallelFixture() {
        for (const std::string& d : dirs) rm_rf(d);
        remove(model.c_str()), remove(data.c_str()), remove(val.c_str());
    }
};

TEST_CASE("2 ranks x micro-batch 2 train what 1 rank trains with 2 micro-batches of 2 accumulated, and with 1 of 4", "[parallel]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), one = fx.dir("one_rank"), wide = fx.dir("one_rank_b4"), two = fx.dir("two_ranks"), out;
    REQUIRE(run("OMP_NUM_THREADS=1 build/train_sft_cpu" + fx.common + " -b 2 -d 4 -o " + one, &out) == 0);
    REQUIRE(run("OMP_NUM_THREADS=1 build/train_sft_cpu" + fx.common + " -b 4 -d 4 -o " + wide, &out) == 0);
    int rc = run(mpirun + "build/train_sft_cpu" + fx.common + " -b 2 -d 4 -o " + two, &out);
    INFO(out);
    REQUIRE(rc == 0);
    // rank 0 alone prints: one header, each step line once, one model saved
    CHECK_THAT(out, Catch::Contains("data parallel: 2 ranks, each 1 micro-batch of 2 per step (total batch 4)"));
    CHECK(count_of(out, "train_sft on cpu") == 1);
    CHECK(count_of(out, "step    6/6 | loss") == 1);
    CHECK(count_of(out, "saved " + two + "/model.bin") == 1);

    std::vector<double> l1 = logged_losses(one + "/log.jsonl"), l2 = logged_losses(two + "/log.jsonl"), lw = logged_losses(wide + "/log.jsonl");
    REQUIRE(l2.size() == 6);
    CHECK(l2[0] == l1[0]);  // step 1: the same weights and micro-batches
    check_close(l2, l1, 1e-5);
    check_close(lw, l1, 1e-5);
    // validation at steps 3 and 6, split over the ranks and summed
    std::vector<double> v1 = logged_values(one + "/log.jsonl", "val_loss"), v2 = logged_values(two + "/log.jsonl", "val_loss");
    REQUIRE(v2.size() == 2);
    check_close(v2, v1, 1e-5);

    std::vector<float> w0 = model_weights(fx.model), w1 = model_weights(one + "/model.bin"), w2 = model_weights(two + "/model.bin"),
                       ww = model_weights(wide + "/model.bin");
    double moved = max_abs_diff(w1, w0), d2 = max_abs_diff(w2, w1), dw = max_abs_diff(ww, w1);
    printf("2 ranks x 2 against 1 rank x 2 x 2 accumulated: max |weight difference| %.3g (1 rank x 4: %.3g); the run moved weights by up to %.3g\n", d2,
           dw, moved);
    CHECK(moved > 1e-3);
    CHECK(d2 <= 1e-6);
    CHECK(dw <= 1e-6);
}

TEST_CASE("a 2-rank run stopped at step 3 and resumed on 2 ranks ends bit-identically; on 1 rank it is refused", "[parallel][resume]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), straight = fx.dir("straight2"), resumed = fx.dir("resumed2"), out;
    std::string args = "build/train_sft_cpu" + fx.common + " -b 1 -d 4";  // 2 micro-batches on each rank
    REQUIRE(run(mpirun + args + " -o " + straight, &out) == 0);
    INFO(out);
    REQUIRE(run(mpirun + args + " -o " + resumed + " -X 3", &out) == 0);
    CHECK(!exists(resumed + "/model.bin"));
    CHECK(exists(resumed + "/ckpt_000003/state.bin"));

    int rc = run("OMP_NUM_THREADS=1 " + args + " -o " + resumed + " -y 1", &out);  // the checkpoint of 2 ranks on 1
    CHECK(rc == 1);
    CHECK(count_of(out, "\n") == 1);
    CHECK_THAT(out, Catch::Contains("ckpt_000003 is of another run (ranks: 1 now, 2 in the checkpoint)"));

    REQUIRE(run(mpirun + args + " -o " + resumed + " -y 1", &out) == 0);
    CHECK_THAT(out, Catch::Contains("resumed from"));
    std::vector<unsigned char> a = file_bytes(straight + "/model.bin"), b = file_bytes(resumed + "/model.bin");
    REQUIRE(!a.empty());
    CHECK(a == b);
    CHECK(logged_losses(straight + "/log.jsonl") == logged_losses(resumed + "/log.jsonl"));
    CHECK(logged_losses(resumed + "/log.jsonl").size() == 6);
}

TEST_CASE("ranks that do not divide the total batch, a build without MPI under a launcher, and srun without MPI are refused in one line", "[parallel][flags]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), out;
    int rc = run(mpirun + "build/train_sft_cpu" + fx.common + " -b 4 -d 4 -o " + fx.dir("indivisible"), &out);
    INFO(out);
    CHECK(rc != 0);
    CHECK_THAT(out, Catch::Contains("error: -d: the total batch 4 is not a multiple of the micro-batch -b 4 times the 2 ranks"));
    // the emulated CUDA build has no MPI: a launcher's world of 2 is an error, not 2 separate runs
    rc = run("OMPI_COMM_WORLD_SIZE=2 build/train_sft_emu" + fx.common + " -b 2 -d 4 -o " + fx.dir("no_mpi"), &out);
    CHECK(rc == 1);
    CHECK(count_of(out, "\n") == 1);
    CHECK_THAT(out, Catch::StartsWith("error: the launcher started 2 ranks, but this build has no MPI: multi-rank runs need the MPI build"));
    // ranks started with other flags (mpirun's colon syntax): refused before the first step, by
    // the rank that differs, naming what
    std::string launcher = mpirun.substr(0, mpirun.find(" -np ")), mismatch = fx.dir("mismatch");
    rc = run(launcher + " -np 1 build/train_sft_cpu" + fx.common + " -b 2 -d 4 -o " + mismatch + " : -np 1 build/train_sft_cpu" + fx.common +
             " -b 2 -d 4 -l 2e-2 -o " + mismatch, &out);
    CHECK(rc != 0);
    CHECK_THAT(out, Catch::Contains("error: rank 1 runs with other settings than rank 0 (lr -l: 0.02 on rank 1, 0.01 on rank 0): give every rank the same flags and files"));
    CHECK(!exists(mismatch + "/log.jsonl"));
    // Slurm's srun without its MPI plugin: its tasks are MPI worlds of one each, not one run
    rc = run("SLURM_STEP_NUM_TASKS=2 SLURM_PROCID=0 OMP_NUM_THREADS=1 build/train_sft_cpu" + fx.common + " -b 2 -d 4 -o " + fx.dir("srun"), &out);
    CHECK(rc == 1);
    CHECK(count_of(out, "\n") == 1);
    CHECK_THAT(out, Catch::StartsWith("error: the launcher started 2 ranks but MPI joined 1: under Slurm run srun --mpi=pmix"));
}

// Slurm's srun without an MPI plugin (-I <folder>), the GPU build: each rank takes its rank,
// world and GPU from SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, rank 0 writes NCCL's
// id to <folder>/xwin_nccl_id_<job>_<step> and the others read it, and every collective (the
// host's too: the losses' sums, the settings' broadcast, the checkpoints' gathers) goes over
// NCCL. Here the emulated GPU build runs under mpirun, its ranks' Slurm variables set from
// mpirun's, and its NCCL's transport is MPI, which the emulation initialises itself: the run
// must be the bits of the same ranks joined over MPI, and the program must not have initialised
// MPI. A missing id file (rank 0 not running) ends the wait with one line naming the file, as
// does a file that is not an id of this run; the CPU build, which talks over MPI alone, refuses -I.
TEST_CASE("srun without MPI (-I): ranks from Slurm, NCCL's id through a file, every collective over NCCL; bad setups in one line", "[parallel][srun]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), over_mpi = fx.dir("srun_mpi"), over_file = fx.dir("srun_file"), ids = fx.dir("srun_ids"), out;
    make_dir(ids.c_str());
    std::string env = "XWIN_EMU_THREADS=1 XWIN_EMU_DEVICES=2 ", args = fx.common + " -b 1 -d 4 -z 2 -n 3";
    REQUIRE(run(env + mpirun + "build/train_sft_nccl_emu" + args + " -o " + over_mpi, &out) == 0);
    std::string slurm = "SLURM_PROCID=\\$OMPI_COMM_WORLD_RANK SLURM_LOCALID=\\$OMPI_COMM_WORLD_LOCAL_RANK SLURM_STEP_NUM_TASKS=2 SLURM_JOB_ID=77 SLURM_STEP_ID=3";
    int rc = run(env + "XWIN_NCCL_EMU_COUNTS=1 " + mpirun + "sh -c \"" + slurm + " exec build/train_sft_nccl_emu" + args + " -I " + ids + " -o " + over_file + "\"",
                 &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("nccl_emu rank 0: all-reduces"));
    CHECK(count_of(out, "; the program did not initialise MPI") == 2);
    CHECK_THAT(out, Catch::Contains("data parallel: 2 ranks"));
    std::vector<unsigned char> a = file_bytes(over_mpi + "/model.bin");
    REQUIRE(!a.empty());
    CHECK(file_bytes(over_file + "/model.bin") == a);
    CHECK(logged_losses(over_file + "/log.jsonl") == logged_losses(over_mpi + "/log.jsonl"));
    CHECK(exists(over_file + "/ckpt_000006"));
    CHECK(!exists(ids + "/xwin_nccl_id_77_3"));  // spent once every rank had joined
    // rank 1 without rank 0: the wait ends, naming the file
    std::string rank1 = "SLURM_PROCID=1 SLURM_LOCALID=1 SLURM_STEP_NUM_TASKS=2 XWIN_NCCL_ID_TIMEOUT=1 " + env + "build/train_sft_nccl_emu" + args + " -I " + ids;
    rc = run(rank1 + " -o " + fx.dir("srun_alone"), &out);
    CHECK(rc == 1);
    CHECK(count_of(out, "\n") == 1);
    CHECK_THAT(out, Catch::StartsWith("error: -I: rank 1 waited 1 s for rank 0's NCCL id in " + ids + "/xwin_nccl_id_0_0: is rank 0 running"));
    // a file that is not an id of this run
    write_bytes(ids + "/xwin_nccl_id_0_0", std::vector<unsigned char>(300, 'x'));
    rc = run(rank1 + " -o " + fx.dir("srun_stale"), &out);
    CHECK(rc == 1);
    CHECK_THAT(out, Catch::StartsWith("error: -I: " + ids + "/xwin_nccl_id_0_0 is not rank 0's NCCL id for this run of 2 ranks (not an id file)"));
    // the CPU build talks over MPI alone
    rc = run("SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_NUM_TASKS=2 OMP_NUM_THREADS=1 build/train_sft_cpu" + args + " -I " + ids + " -o " + fx.dir("srun_cpu"), &out);
    CHECK(rc == 1);
    CHECK_THAT(out, Catch::StartsWith("error: -I: ranks without MPI talk over NCCL, which only the GPU build has"));
}

// ZeRO-1 (-z 1): each rank updates its half of the flat weights with its half of the AdamW
// moments from the same all-reduced gradient, and the halves are gathered after the update.
// Every element takes the same arithmetic as without ZeRO, and the clip's norm is taken over
// the whole reduced gradient as before, so the run is ZeRO-0's bit for bit. Its checkpoints
// keep the moments where they live: each rank writes its half to shard_<rank>_of_2.bin, and
// rank 0 a state.bin without moments (version 4, ZeRO-0's header otherwise); the halves, in
// rank order, are ZeRO-0's moments byte for byte. A ZeRO-1 checkpoint resumes with -z 1 (each
// rank reads its file) or -z 0 (each reads both), and ZeRO-0's with -z 1, to the same bits.
TEST_CASE("ZeRO-1 on 2 ranks trains ZeRO-0's bits, and its checkpoint resumes to them with or without ZeRO", "[parallel][zero]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), plain = fx.dir("zero0"), zero = fx.dir("zero1"), plain_at3 = fx.dir("zero0_at3"), zero_at3 = fx.dir("zero1_at3"), out;
    std::string args = "build/train_sft_cpu" + fx.common + " -b 1 -d 4";  // 2 micro-batches on each rank
    REQUIRE(run(mpirun + args + " -o " + plain, &out) == 0);
    int rc = run(mpirun + args + " -z 1 -o " + zero, &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("ZeRO-1: each rank keeps the optimizer state of 1/ranks of the weights"));
    check_same_run(zero, plain, {"loss", "val_loss"});
    std::vector<unsigned char> a = file_bytes(plain + "/model.bin");

    REQUIRE(run(mpirun + args + " -X 3 -o " + plain_at3, &out) == 0);
    REQUIRE(run(mpirun + args + " -z 1 -n 1 -X 3 -o " + zero_at3, &out) == 0);  // checkpoints at steps 1, 2, 3
    std::string ckpt = zero_at3 + "/ckpt_000003";
    size_t n = model_weights(fx.model).size();
    std::vector<unsigned char> full = file_bytes(plain_at3 + "/ckpt_000003/state.bin"), head = file_bytes(ckpt + "/state.bin");
    REQUIRE(full.size() == STATE_HEADER_BYTES + 8 * n + 4);
    CHECK(!exists(plain_at3 + "/ckpt_000003/" + shard_file_name(0, 2)));  // ZeRO-0 writes no shard file
    // state.bin: ZeRO-0's header with version 4 in place of 3, then its checksum
    REQUIRE(head.size() == STATE_HEADER_BYTES + 4);
    CHECK(head[4] == 4);
    CHECK(full[4] == 3);
    head[4] = 3;
    CHECK(std::equal(head.begin(), head.begin() + STATE_HEADER_BYTES, full.begin()));
    // each rank's file: a 128-byte header, its part's m then v, the checksum of it all
    std::vector<unsigned char> m, v;
    for (int k = 0; k < 2; k++) {
        Shard part = shard_of(n, k, 2);
        size_t count = part.end - part.begin;
        std::vector<unsigned char> b = file_bytes(ckpt + "/" + shard_file_name(k, 2));
        INFO("rank " << k);
        REQUIRE(count > 0);
        REQUIRE(b.size() == SHARD_HEADER_BYTES + 8 * count + 4);
        uint32_t header[6], stored_crc;
        uint64_t range[3];
        memcpy(header, b.data(), sizeof(header));
        memcpy(range, b.data() + 24, sizeof(range));
        memcpy(&stored_crc, b.data() + b.size() - 4, 4);
        CHECK(header[0] == SHARD_MAGIC);
        CHECK(header[2] == (uint32_t)k);
        CHECK(header[3] == 2);
        CHECK(header[4] == 3);
        CHECK((range[0] == n && range[1] == part.begin && range[2] == part.end));
        CHECK(memcmp(b.data() + 48, full.data() + 56, sizeof(RunIdentity)) == 0);  // state.bin's identity
        CHECK(crc32_update(0, b.data(), b.size() - 4) == stored_crc);
        m.insert(m.end(), b.begin() + SHARD_HEADER_BYTES, b.begin() + SHARD_HEADER_BYTES + 4 * count);
        v.insert(v.end(), b.begin() + SHARD_HEADER_BYTES + 4 * count, b.end() - 4);
    }
    std::vector<unsigned char> full_m(full.begin() + STATE_HEADER_BYTES, full.begin() + STATE_HEADER_BYTES + 4 * n),
        full_v(full.begin() + STATE_HEADER_BYTES + 4 * n, full.end() - 4);
    CHECK(std::count(full_v.begin(), full_v.end(), 0) < (long)n);  // moments that a wrong half would not match
    CHECK(m == full_m);
    CHECK(v == full_v);

    // resumed from each checkpoint (a copy of it): ZeRO-0's final bits and losses
    struct Resume { std::string from; const char* zero; };
    for (const Resume& r : std::vector<Resume>{{zero_at3, " -z 1"}, {zero_at3, " -z 0"}, {plain_at3, " -z 1"}}) {
        std::string resumed = fx.dir("zero_resumed");
        REQUIRE(run("cp -r " + r.from + " " + resumed, &out) == 0);
        rc = run(mpirun + args + r.zero + " -y 1 -o " + resumed, &out);
        INFO("resumed " << r.from << " with" << r.zero << "\n" << out);
        REQUIRE(rc == 0);
        CHECK_THAT(out, Catch::Contains("resumed from " + resumed + "/ckpt_000003 at step 3"));
        CHECK(file_bytes(resumed + "/model.bin") == a);
        CHECK(logged_losses(resumed + "/log.jsonl") == logged_losses(plain + "/log.jsonl"));
    }
    // on 1 rank a checkpoint of 2 is refused in one line; with -F 1 the rank reads both files'
    // halves, and trains ZeRO-0's run to rounding (the test above: 1 rank against 2)
    std::string one = fx.dir("zero_on_one");
    REQUIRE(run("cp -r " + zero_at3 + " " + one, &out) == 0);
    rc = run("OMP_NUM_THREADS=1 " + args + " -z 1 -y 1 -o " + one, &out);
    CHECK(rc == 1);
    CHECK(count_of(out, "\n") == 1);
    CHECK_THAT(out, Catch::Contains("ckpt_000003 is of another run (ranks: 1 now, 2 in the checkpoint)"));
    rc = run("OMP_NUM_THREADS=1 " + args + " -z 1 -y 1 -F 1 -o " + one, &out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("warning: -F 1: resuming ckpt_000003 of another run (ranks: 1 now, 2 in the checkpoint)"));
    double d = max_abs_diff(model_weights(one + "/model.bin"), model_weights(plain + "/model.bin"));
    printf("a 2-rank ZeRO-1 checkpoint resumed on 1 rank: max |weight difference| %.3g against 2 ranks\n", d);
    CHECK(d <= 1e-6);
}

// A ZeRO-1 checkpoint whose shard file is missing, short, corrupt or of another rank, step or
// run is refused: the rank that reads it names the file and what is wrong in one line, and every rank
// exits 1 before the first step. A rank that cannot write its shard file stops the run before
// rank 0 writes the marker (<out>/latest), so the checkpoint it left unfinished is not resumed:
// the one before it is, to the uninterrupted run's bits.
TEST_CASE("a ZeRO-1 checkpoint with a shard file missing, short, corrupt or foreign is refused; one never finished is not resumed", "[parallel][zero]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), plain = fx.dir("shards_plain"), stopped = fx.dir("shards_stopped"), out;
    std::string args = "build/train_sft_cpu" + fx.common + " -b 1 -d 4 -z 1";
    REQUIRE(run(mpirun + args + " -o " + plain, &out) == 0);
    REQUIRE(run(mpirun + args + " -n 1 -X 3 -o " + stopped, &out) == 0);
    std::string ckpt = "/ckpt_000003/", shard0 = shard_file_name(0, 2), shard1 = shard_file_name(1, 2);
    size_t n = model_weights(fx.model).size();
    // a 4-byte field of a file set to value, its checksum made valid again
    auto patch = [](const std::string& path, size_t offset, uint32_t value) {
        std::vector<unsigned char> b = file_bytes(path);
        REQUIRE(b.size() > offset + 8);
        memcpy(&b[offset], &value, 4);
        uint32_t crc = crc32_update(0, b.data(), b.size() - 4);
        memcpy(&b[b.size() - 4], &crc, 4);
        write_bytes(path, b);
    };
    struct Damage { const char* what; std::function<void(const std::string&)> apply; std::string file, message; };
    std::vector<Damage> damages = {
        {"missing", [&](const std::string& d) { remove((d + ckpt + shard1).c_str()); }, shard1,
         "cannot open it (No such file or directory): the checkpoint keeps its AdamW moments in 2 shard files, one per rank"},
        {"short",
         [&](const std::string& d) {
             std::vector<unsigned char> b = file_bytes(d + ckpt + shard0);
             b.pop_back();
             write_bytes(d + ckpt + shard0, b);
         },
         shard0, string_format("file is %zu bytes, expected %zu", SHARD_HEADER_BYTES + 8 * shard_of(n, 0, 2).per + 3, SHARD_HEADER_BYTES + 8 * shard_of(n, 0, 2).per + 4)},
        {"corrupt",
         [&](const std::string& d) {
             std::vector<unsigned char> b = file_bytes(d + ckpt + shard1);
             b[SHARD_HEADER_BYTES + 5] ^= 1;
             write_bytes(d + ckpt + shard1, b);
         },
         shard1, "checksum mismatch"},
        {"of another step",
         [&](const std::string& d) {
             std::string said;
             REQUIRE(run("cp " + d + "/ckpt_000002/" + shard1 + " " + d + ckpt + shard1, &said) == 0);
         },
         shard1, "holds step 2, its checkpoint's state.bin step 3"},
        {"of another rank", [&](const std::string& d) { patch(d + ckpt + shard1, 8, 0); }, shard1, "holds the part of rank 0 of 2, expected rank 1 of 2"},
        {"of another run", [&](const std::string& d) { patch(d + ckpt + shard0, 48 + offsetof(RunIdentity, seed), 6); }, shard0,
         "is of another run than its checkpoint's state.bin (seed -S: 6 in this file, 5 in state.bin)"},
    };
    for (const Damage& damage : damages) {
        std::string dir = fx.dir("shards_damaged");
        REQUIRE(run("cp -r " + stopped + " " + dir, &out) == 0);
        damage.apply(dir);
        int rc = run(mpirun + args + " -y 1 -o " + dir, &out);
        INFO(damage.what << "\n" << out);
        CHECK(rc != 0);
        CHECK(count_of(out, "error: ") == 1);
        CHECK_THAT(out, Catch::Contains("error: " + dir + ckpt + damage.file + ": " + damage.message));
        CHECK(count_of(out, "resumed from") == 0);
        CHECK(logged_losses(dir + "/log.jsonl").size() == 3);  // the log is as the stopped run left it
    }
    // rank 1's shard file at step 2 cannot be written (a full disk): the run stops, and latest
    // still names step 1's checkpoint, whose resume ends on the uninterrupted run's bits
    std::string full = fx.dir("shards_full_disk");
    make_dir(full + "/ckpt_000002");
    REQUIRE(symlink("/dev/full", (full + "/ckpt_000002/" + shard1 + ".tmp").c_str()) == 0);
    int rc = run(mpirun + args + " -n 1 -o " + full, &out);
    INFO(out);
    CHECK(rc != 0);
    CHECK_THAT(out, Catch::Contains("error: " + full + "/ckpt_000002/" + shard1 + ": write failed: No space left on device"));
    CHECK(exists(full + "/ckpt_000002/state.bin"));  // rank 0 wrote its files, then waited for rank 1's
    CHECK(checkpoint_latest(full) == full + "/ckpt_000001");
    rc = run(mpirun + args + " -y 1 -o " + full, &out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("resumed from " + full + "/ckpt_000001 at step 1"));
    CHECK(file_bytes(full + "/model.bin") == file_bytes(plain + "/model.bin"));
    CHECK(logged_losses(full + "/log.jsonl") == logged_losses(plain + "/log.jsonl"));
}

// ZeRO-2 (-z 2): after each micro-batch's backward every gradient element is reduced to the
// rank whose part holds it; the rank keeps that part alone (the GPU: layer by layer during the
// backward, through two reused layer buckets). With one micro-batch a rank each element is the
// same sum of the same two values as ZeRO-0's all-reduce, and the clip's norm is summed by the
// same 64 chunks (a chunk across the two parts as two double sums added), so the run is
// ZeRO-0's bit for bit. With two micro-batches a rank the step's sum is added up in another
// order ((a1 + b1) + a2) + b2 against (a1 + a2) + (b1 + b2)), so the comparison holds to
// rounding, as 2 ranks against 1 rank does (the file's first comment): losses to 1e-5 relative,
// weights to 1e-6.
TEST_CASE("ZeRO-2 on 2 ranks trains ZeRO-0's bits with a micro-batch a rank, to rounding with two, and resumes to its own bits", "[parallel][zero]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), out;
    std::string one_micro = "build/train_sft_cpu" + fx.common + " -b 2 -d 4", two_micro = "build/train_sft_cpu" + fx.common + " -b 1 -d 4";
    std::string plain = fx.dir("z2_plain"), zero2 = fx.dir("z2"), plain2 = fx.dir("z2_plain_accum"), zero2_2 = fx.dir("z2_accum");
    REQUIRE(run(mpirun + one_micro + " -o " + plain, &out) == 0);
    int rc = run(mpirun + one_micro + " -z 2 -o " + zero2, &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("ZeRO-2: each rank keeps the optimizer state and the gradient of 1/ranks of the weights"));
    check_same_run(zero2, plain, {"loss", "norm", "val_loss"});
    REQUIRE(run(mpirun + two_micro + " -o " + plain2, &out) == 0);
    REQUIRE(run(mpirun + two_micro + " -z 2 -o " + zero2_2, &out) == 0);
    check_same_to_rounding(zero2_2, plain2, 1e-5, 1e-6, "ZeRO-2 against ZeRO-0, 2 ranks x 2 micro-batches");
    CHECK(file_bytes(zero2_2 + "/model.bin") != file_bytes(plain2 + "/model.bin"));  // the sums' order differs (the comparison above is not vacuous)
    // stopped at step 3 and resumed with -z 2: the uninterrupted run's bits
    std::string resumed = fx.dir("z2_resumed");
    REQUIRE(run(mpirun + two_micro + " -z 2 -X 3 -o " + resumed, &out) == 0);
    REQUIRE(run(mpirun + two_micro + " -z 2 -y 1 -o " + resumed, &out) == 0);
    CHECK(file_bytes(resumed + "/model.bin") == file_bytes(zero2_2 + "/model.bin"));
}

// The reward model and DPO go through the same Trainer: 2 ranks x 2 pairs against 1 rank x 2
// pairs x 2 accumulated, the losses to 1e-5 relative and the step metrics the ranks sum (RM's
// margin, DPO's reward margin) to 1e-4, the final weights to 1e-6 (DPO; measured 1.5e-8) and
// 5e-6 (RM, measured 4.9e-7: its score head takes one += per sequence of a micro-batch, and
// it learns at 3e-3).
TEST_CASE("train_rm and train_dpo: 2 ranks x 2 pairs train what 1 rank trains with 2 micro-batches of 2 pairs", "[parallel][rm][dpo]") {
    std::string mpirun = mpirun2(), out;
    std::string model = write_small_model("parallel_pairs_model.bin"), train = write_arith_pairs("parallel_pairs", 24, 1),
                val = write_arith_pairs("parallel_pairs_val", 8, 2);
    struct Stage { const char* binary; std::string args; const char* metric; double weight_tolerance; };
    std::vector<Stage> stages = {
        {"build/train_rm_cpu", " -e " + model + " -i " + train + " -j " + val + " -x 4 -u 2 -l 3e-3 -v 4 -n 0 -S 3", "margin", 5e-6},
        // the 2-rank run goes first: its rank 0 computes the reference file, rank 1 reads it
        {"build/train_dpo_cpu", " -e " + model + " -i " + train + " -j " + val + " -p '' -x 4 -u 2 -l 1e-3 -v 4 -n 0 -S 3", "rewards/margins", 1e-6},
    };
    for (const Stage& s : stages) {
        std::string two = scratch("pairs_two"), one = scratch("pairs_one"), zero = scratch("pairs_zero");
        rm_rf(two), rm_rf(one), rm_rf(zero);
        int rc = run(mpirun + s.binary + s.args + " -b 2 -d 4 -o " + two, &out);
        INFO(s.binary << "\n" << out);
        REQUIRE(rc == 0);
        CHECK_THAT(out, Catch::Contains("data parallel: 2 ranks, each 1 micro-batch of 2 per step (total batch 4)"));
        for (const char* z : {" -z 1", " -z 2"}) {  // ZeRO-1 and ZeRO-2 (a micro-batch a rank): the same bits
            rm_rf(zero);
            REQUIRE(run(mpirun + s.binary + s.args + " -b 2 -d 4" + z + " -o " + zero, &out) == 0);
            INFO(z);
            CHECK(file_bytes(zero + "/model.bin") == file_bytes(two + "/model.bin"));
            CHECK(logged_losses(zero + "/log.jsonl") == logged_losses(two + "/log.jsonl"));
        }
        // DPO's reference pass is split over the ranks (a block of the pairs each, gathered): the
        // file rank 0 wrote is the file one rank computes, byte for byte
        std::vector<unsigned char> ref2 = file_bytes(train + ".logps"), val_ref2 = file_bytes(val + ".logps");
        if (!ref2.empty()) remove((train + ".logps").c_str()), remove((val + ".logps").c_str());
        REQUIRE(run("OMP_NUM_THREADS=1 " + std::string(s.binary) + s.args + " -b 2 -d 4 -o " + one, &out) == 0);
        if (!ref2.empty()) {
            CHECK(file_bytes(train + ".logps") == ref2);
            CHECK(file_bytes(val + ".logps") == val_ref2);
            CHECK(!val_ref2.empty());
        }
        std::vector<double> l2 = logged_losses(two + "/log.jsonl"), l1 = logged_losses(one + "/log.jsonl");
        REQUIRE(l2.size() == 4);
        CHECK(l2[0] == l1[0]);
        check_close(l2, l1, 1e-5);
        check_close(logged_values(two + "/log.jsonl", s.metric), logged_values(one + "/log.jsonl", s.metric), 1e-4);
        // validation at step 4: a block of the held-out pairs on each rank, summed or gathered
        std::vector<double> v2 = logged_values(two + "/log.jsonl", "val_loss"), v1 = logged_values(one + "/log.jsonl", "val_loss");
        REQUIRE(v2.size() == 1);
        check_close(v2, v1, 1e-5);
        double d = max_abs_diff(model_weights(two + "/model.bin"), model_weights(one + "/model.bin"));
        printf("%s: 2 ranks x 2 pairs against 1 rank x 2 x 2 accumulated: max |weight difference| %.3g\n", s.binary, d);
        CHECK(d <= s.weight_tolerance);
        rm_rf(two), rm_rf(one), rm_rf(zero);
    }
    remove(model.c_str()), remove(train.c_str()), remove(val.c_str()), remove((train + ".logps").c_str()), remove((val + ".logps").c_str());
}

// The GPU program's own rank code, on the CPU: the CUDA build over test/cuda_emu.h with NCCL
// emulated over MPI (test/nccl_emu.h): comm_init's NCCL setup and device choice, the gradients'
// all-reduce in device memory. One process of that build is the plain CUDA build bit for bit.
// Against one rank the BF16 build differs by more than the CPU build: a master weight that
// rounds differently moves its BF16 copy by a whole BF16 step (2^-8 relative) in the next
// forward, so the losses agree to 1e-4 relative and the FP32 master weights to 1e-5.
TEST_CASE("the CUDA build's ranks (emulated, NCCL over MPI): 2 ranks x 2 train what 1 rank x 2 x 2 accumulated trains", "[parallel][emu]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), one = fx.dir("emu_one"), plain = fx.dir("emu_plain"), two = fx.dir("emu_two"), out;
    std::string env = "XWIN_EMU_THREADS=1 XWIN_EMU_DEVICES=2 ";
    REQUIRE(run(env + "OMP_NUM_THREADS=1 build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4 -o " + one, &out) == 0);
    REQUIRE(run(env + "OMP_NUM_THREADS=1 build/train_sft_emu" + fx.common + " -b 2 -d 4 -o " + plain, &out) == 0);
    CHECK(file_bytes(one + "/model.bin") == file_bytes(plain + "/model.bin"));
    int rc = run(env + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4 -o " + two, &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("data parallel: 2 ranks"));
    check_same_to_rounding(two, one, 1e-4, 1e-5, "CUDA build (emulated), 2 ranks x 2 against 1 rank x 2 x 2 accumulated");
    std::vector<double> l2 = logged_losses(two + "/log.jsonl");
    // the backward reduces each layer's gradients as soon as it is done, on its own stream: per
    // step and rank, 2 layers x 9 tensor slices during the backward, then the embedding and the
    // final norm (the head is the embedding: tied); 6 steps: 120 all-reduces, all in NCCL groups
    // (validation's forwards reduce nothing). The run above, against one rank, went this way.
    rc = run(env + "XWIN_NCCL_EMU_COUNTS=1 " + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4 -o " + fx.dir("emu_counts"), &out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("nccl_emu rank 0: all-reduces 120 (120 in groups)"));
    CHECK_THAT(out, Catch::Contains("nccl_emu rank 1: all-reduces 120 (120 in groups)"));
    // ZeRO-1: each rank's half of the FP32 master weights and moments on its device, the BF16
    // compute copy all-gathered over NCCL after the update, the master halves gathered to save:
    // the same bits as ZeRO-0, and the memory plan says each rank's share
    std::string zero = fx.dir("emu_zero");
    rc = run(env + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4 -z 1 -o " + zero, &out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("ZeRO-1 over 2 ranks, per rank"));
    CHECK(file_bytes(zero + "/model.bin") == file_bytes(two + "/model.bin"));
    CHECK(logged_losses(zero + "/log.jsonl") == l2);
    // ZeRO-2: each layer's gradients written to one of two layer buckets, reduced to the ranks
    // (ncclReduce) during the backward: per micro-batch, 2 layers x 9 slices, the embedding and
    // the final norm, and the one slice that the parts' boundary splits: 21 reduces, 126 in 6
    // steps; one all-reduce a step (the norm's partial sums). Without the clip (-G 0) the bits of
    // ZeRO-0: the GPU norm's float partial sums follow each rank's part, so with the clip the
    // coefficient rounds otherwise
    std::string zero2 = fx.dir("emu_zero2"), plain_noclip = fx.dir("emu_noclip");
    REQUIRE(run(env + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4 -G 0 -o " + plain_noclip, &out) == 0);
    rc = run(env + "XWIN_NCCL_EMU_COUNTS=1 " + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4 -G 0 -z 2 -o " + zero2, &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("ZeRO-2 over 2 ranks, per rank"));
    CHECK_THAT(out, Catch::Contains("nccl_emu rank 0: all-reduces 6 (0 in groups), reduces 126"));
    CHECK_THAT(out, Catch::Contains("nccl_emu rank 1: all-reduces 6 (0 in groups), reduces 126"));
    CHECK(file_bytes(zero2 + "/model.bin") == file_bytes(plain_noclip + "/model.bin"));
    CHECK(logged_losses(zero2 + "/log.jsonl") == logged_losses(plain_noclip + "/log.jsonl"));
    // two micro-batches a rank, with the clip: to the rounding of the BF16 build's ranks (above)
    std::string zero2_accum = fx.dir("emu_zero2_accum"), plain_accum = fx.dir("emu_plain_accum");
    REQUIRE(run(env + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 1 -d 4 -o " + plain_accum, &out) == 0);
    REQUIRE(run(env + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 1 -d 4 -z 2 -o " + zero2_accum, &out) == 0);
    check_same_to_rounding(zero2_accum, plain_accum, 1e-4, 1e-5, "CUDA build (emulated), ZeRO-2 against ZeRO-0, 2 ranks x 2 micro-batches");
    // its checkpoint: each rank writes its half of the moments to its shard file (the FP32
    // master weights are model.bin's, gathered); resumed with -z 1 (each rank's master half from
    // model.bin, its moments from its file) and with -z 0, the uninterrupted run's bits
    std::string stopped = fx.dir("emu_zero_stopped");
    REQUIRE(run(env + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4 -z 1 -X 3 -o " + stopped, &out) == 0);
    CHECK(exists(stopped + "/ckpt_000003/" + shard_file_name(0, 2)));
    CHECK(exists(stopped + "/ckpt_000003/" + shard_file_name(1, 2)));
    CHECK(file_bytes(stopped + "/ckpt_000003/state.bin").size() == STATE_HEADER_BYTES + 4);
    for (const char* z : {" -z 1", " -z 0"}) {
        std::string resumed = fx.dir("emu_zero_resumed");
        REQUIRE(run("cp -r " + stopped + " " + resumed, &out) == 0);
        rc = run(env + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4" + z + " -y 1 -o " + resumed, &out);
        INFO("resumed with" << z << "\n" << out);
        REQUIRE(rc == 0);
        CHECK_THAT(out, Catch::Contains("resumed from " + resumed + "/ckpt_000003 at step 3"));
        CHECK(file_bytes(resumed + "/model.bin") == file_bytes(zero + "/model.bin"));
        CHECK(logged_losses(resumed + "/log.jsonl") == l2);
    }
    // a rank per device: 2 ranks on a node of one device are refused
    rc = run("XWIN_EMU_THREADS=1 " + mpirun + "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4 -o " + fx.dir("emu_one_device"), &out);
    CHECK(rc != 0);
    CHECK_THAT(out, Catch::Contains("error: rank 1 is rank 1 of its node, which has 1 GPU: run at most one rank per GPU"));
}

// A rank that dies (kill -9 of rank 1 in the middle of a run, checkpoints every step): mpirun
// ends the run within a bounded time, non-zero, naming the rank; the last complete checkpoint
// (its 'latest' marker is written by rank 0 after every rank has written its shard file)
// resumes on 2 ranks to the uninterrupted run's bits, with ZeRO-1.
TEST_CASE("kill -9 of one rank ends the run within 60 s naming it, and the resume ends bit-identically", "[parallel][kill]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), straight = fx.dir("kill_straight"), killed = fx.dir("kill_killed"), log = fx.dir("kill.log"), out;
    std::string args = "build/train_sft_cpu" + fx.common + " -b 1 -d 4 -x 40 -n 1 -z 1";
    REQUIRE(run(mpirun + args + " -o " + straight, &out) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", ("exec env " + mpirun + args + " -o " + killed + " >" + log + " 2>&1").c_str(), (char*)nullptr);
        _exit(127);
    }
    auto t0 = std::chrono::steady_clock::now();
    auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
    while (logged_losses(killed + "/log.jsonl").size() < 3 && seconds() < 60) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    REQUIRE(logged_losses(killed + "/log.jsonl").size() < 40);  // still running
    // rank 1: the process of this run whose environment says so
    std::string find = "for p in $(pgrep -f -- '-o " + killed + "$'); do tr '\\0' '\\n' < /proc/$p/environ | grep -qx OMPI_COMM_WORLD_RANK=1 && echo $p; done";
    REQUIRE(run(find, &out) == 0);
    pid_t rank1 = (pid_t)atoi(out.c_str());
    REQUIRE(rank1 > 0);
    REQUIRE(kill(rank1, SIGKILL) == 0);
    double killed_at = seconds();
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0 && seconds() - killed_at < 60) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    double took = seconds() - killed_at;
    if (took >= 60) kill(pid, SIGKILL), waitpid(pid, &status, 0);
    std::vector<unsigned char> text = file_bytes(log);
    std::string said(text.begin(), text.end());
    INFO(said);
    printf("kill -9 of rank 1 after step %zu: the run ended %.1f s later\n", logged_losses(killed + "/log.jsonl").size(), took);
    CHECK(took < 60);
    CHECK(!(WIFEXITED(status) && WEXITSTATUS(status) == 0));
    CHECK_THAT(said, Catch::Contains("rank 1"));
    REQUIRE(exists(killed + "/latest"));
    REQUIRE(run(mpirun + args + " -o " + killed + " -y 1", &out) == 0);
    CHECK(logged_losses(killed + "/log.jsonl") == logged_losses(straight + "/log.jsonl"));
    CHECK(file_bytes(killed + "/model.bin") == file_bytes(straight + "/model.bin"));
}

// Activation recomputation (-r 1): the backward recomputes each layer's RMSNorm outputs (from the
// kept residual and rstd, in the forward's order: rmsnorm_recompute) and SwiGLU product (from
// the kept gate and up) into one layer's buffers, the forward's values bit for bit, so the run
// is a run without it bit for bit: train_sft on the CPU build and on the emulated GPU build,
// train_rm and train_dpo, and with ZeRO-1 on 2 ranks.
TEST_CASE("activation recomputation (-r 1) trains the bits of a run without it, on both builds, with ZeRO-1 too", "[parallel][recompute]") {
    ParallelFixture fx;
    std::string pairs_model = write_small_model("recompute_pairs_model.bin"), pairs = write_arith_pairs("recompute_pairs", 16, 1), out;
    struct Case { std::string cmd; const char* name; };
    std::vector<Case> cases = {
        {"OMP_NUM_THREADS=1 build/train_sft_cpu" + fx.common + " -b 2 -d 4", "train_sft (CPU)"},
        {"XWIN_EMU_THREADS=1 OMP_NUM_THREADS=1 build/train_sft_emu" + fx.common + " -b 2 -d 4", "train_sft (CUDA build, emulated)"},
        {"OMP_NUM_THREADS=1 build/train_rm_cpu -e " + pairs_model + " -i " + pairs + " -j '' -x 3 -u 1 -l 3e-3 -n 0 -S 3 -b 2 -d 4", "train_rm"},
        {"OMP_NUM_THREADS=1 build/train_dpo_cpu -e " + pairs_model + " -i " + pairs + " -j '' -p '' -x 3 -u 1 -l 1e-3 -n 0 -S 3 -b 2 -d 4", "train_dpo"},
        {mpirun2() + "build/train_sft_cpu" + fx.common + " -b 1 -d 4 -z 1", "train_sft, 2 ranks, ZeRO-1"},
    };
    for (const Case& c : cases) {
        std::string plain = fx.dir("recompute_off"), re = fx.dir("recompute_on");
        int rc = run(c.cmd + " -o " + plain, &out);
        INFO(c.name << "\n" << out);
        REQUIRE(rc == 0);
        REQUIRE(run(c.cmd + " -r 1 -o " + re, &out) == 0);
        std::vector<unsigned char> a = file_bytes(plain + "/model.bin");
        REQUIRE(!a.empty());
        CHECK(file_bytes(re + "/model.bin") == a);
        CHECK(logged_losses(re + "/log.jsonl") == logged_losses(plain + "/log.jsonl"));
        CHECK(logged_losses(re + "/log.jsonl").size() >= 3);
    }
    remove(pairs_model.c_str()), remove(pairs.c_str()), remove((pairs + ".logps").c_str());
}

// ./sample under mpirun: each rank samples a block of the prompts (a response's random stream
// depends on its prompt's index alone) and rank 0 writes the rows in prompt order, so the set
// (-m set, scored by a reward model and the policy) and the evaluation (-m eval, AlpacaEval's
// .json list) are the files of one rank, byte for byte; 5 prompts split 3 + 2, two prompts per
// decode batch.
TEST_CASE("./sample on 2 ranks writes the set and the evaluation of 1 rank, byte for byte", "[parallel][sample]") {
    std::string mpirun = mpirun2(), model = write_small_model("parallel_sample_policy.bin"), rm = write_small_reward_model("parallel_sample_rm.bin");
    std::string one = scratch("set_one.jsonl"), two = scratch("set_two.jsonl"), eval_one = scratch("eval_one.json"), eval_two = scratch("eval_two.json"), out;
    std::string set = "build/sample_cpu -e " + model + " -V " + rm + " -m set -A 4 -b 8 -f 5 -g 8 -T 1.5";
    REQUIRE(run("OMP_NUM_THREADS=1 " + set + " -o " + one, &out) == 0);
    int rc = run(mpirun + set + " -o " + two, &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK_THAT(out, Catch::Contains("data parallel: 2 ranks"));
    CHECK(count_of(out, "wrote ") == 1);
    std::vector<unsigned char> a = file_bytes(one);
    REQUIRE(count_of(std::string(a.begin(), a.end()), "\"rm_scores\"") == 5);
    CHECK(file_bytes(two) == a);
    std::string eval = "build/sample_cpu -m eval -e " + model + " -f 5 -g 8";
    REQUIRE(run("OMP_NUM_THREADS=1 " + eval + " -o " + eval_one, &out) == 0);
    std::string line_one = out.substr(out.find("gold judge mean"));
    REQUIRE(run(mpirun + eval + " -o " + eval_two, &out) == 0);
    CHECK(file_bytes(eval_two) == file_bytes(eval_one));
    CHECK(out.substr(out.find("gold judge mean")).substr(0, 30) == line_one.substr(0, 30));  // the mean over all 5 prompts
    // the other modes run on one process
    rc = run(mpirun + "build/sample_cpu -e " + model + " -m chat < /dev/null", &out);
    CHECK(rc != 0);
    CHECK_THAT(out, Catch::Contains("error: -m: runs on one process: only set and eval split their prompts across 2 ranks"));
    for (const std::string& f : {model, rm, one, two, eval_one, eval_two}) remove(f.c_str());
}

// The closing evaluation of train_sft (greedy answers to 100 held-out world prompts, judged) is
// split over the ranks: each answers a block and the scores are gathered. The model is first
// taught to answer "The answer is 9." to the first 40 single-turn prompts (8 of the 100 have
// gold 9; rank 0's block, the first 50, holds only some of them), then trained at a learning
// rate of 1e-30, where the weights end where they start on any number of ranks: the judge's
// line must be one rank's exactly, and not all zeros.
TEST_CASE("train_sft's closing evaluation on 2 ranks judges what 1 rank judges", "[parallel][eval]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), model = write_small_model("nine_start.bin", 64, 2), jsonl = scratch("nine.jsonl"), tok = scratch("nine.tok");
    std::string taught = fx.dir("nine"), out, text;
    std::vector<WorldPrompt> prompts = world_load_prompts("data/world/eval_prompts.tsv");
    for (size_t i = 0, n = 0; i < prompts.size() && n < 40; i++) {
        const std::vector<std::string>& m = prompts[i].messages;  // system, user, ...
        if (m.size() != 2) continue;
        text += "{\"messages\": [{\"role\": \"system\", \"content\": \"" + m[0] + "\"}, " + conversation_json({m[1], "The answer is 9."}).substr(1) + "}\n";
        n++;
    }
    write_bytes(jsonl, std::vector<unsigned char>(text.begin(), text.end()));
    REQUIRE(run("python3 dev/data/prepare_sft.py " + jsonl + " " + tok + " --tokenizer byte", &out) == 0);
    REQUIRE(run("OMP_NUM_THREADS=1 build/train_sft_cpu -e " + model + " -i " + tok + " -j '' -p '' -x 400 -u 5 -l 5e-3 -n 0 -s 0 -b 4 -d 4 -o " + taught,
                &out) == 0);
    std::string args = "build/train_sft_cpu -e " + taught + "/model.bin -i " + fx.data + " -j '' -p data/world/eval_prompts.tsv -x 2 -l 1e-30 -n 0 -s 0 -b 2 -d 4";
    auto judge_line = [](const std::string& o) {
        size_t at = o.find("gold judge: mean");
        return at == std::string::npos ? std::string() : o.substr(at, o.find('\n', at) - at);
    };
    REQUIRE(run("OMP_NUM_THREADS=1 " + args + " -o " + fx.dir("eval_one"), &out) == 0);
    std::string one = judge_line(out);
    INFO(out);
    CHECK_THAT(one, Catch::StartsWith("gold judge: mean"));
    CHECK_THAT(one, !Catch::StartsWith("gold judge: mean 0.00"));
    int rc = run(mpirun + args + " -o " + fx.dir("eval_two"), &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(judge_line(out) == one);
    CHECK(count_of(out, "gold judge: mean") == 1);
    remove(jsonl.c_str()), remove(tok.c_str()), remove(model.c_str());
}

// The recipe under mpirun (mpirun -np N ./train_dpo): a stage's data-parallel program runs on N
// new ranks that the run's ranks spawn together, and every other command on rank 0 alone,
// without the launcher's variables. train_dpo -J runs one command as the recipe runs a stage's:
// the spawned train_sft (the CPU build, and the GPU build emulated) is a world of 2 of its own
// and trains the bits of mpirun -np 2; a shell command runs once and sees no launcher; a
// failing command stops every rank, non-zero, with the recipe's one-line error, whether the
// children fail at their flags (before comm_init) or at their model (after it).
TEST_CASE("the recipe under mpirun: a data-parallel stage on 2 spawned ranks trains mpirun -np 2's bits, a shell command runs once, a failure stops every rank in one line",
          "[parallel][recipe]") {
    ParallelFixture fx;
    std::string mpirun = mpirun2(), direct = fx.dir("recipe_direct"), spawned = fx.dir("recipe_spawned"), once = fx.dir("recipe_once.txt"), out;
    std::string sft = "build/train_sft_cpu" + fx.common + " -b 2 -d 4";
    REQUIRE(run(mpirun + sft + " -o " + direct, &out) == 0);
    int rc = run(mpirun + "build/train_dpo_cpu -J \"" + sft + " -o " + spawned + "\"", &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(count_of(out, "$ " + sft + " -o " + spawned + "   # on 2 new ranks\n") == 1);
    CHECK(count_of(out, "data parallel: 2 ranks, each 1 micro-batch of 2 per step (total batch 4)") == 1);
    CHECK(count_of(out, "step    6/6 | loss") == 1);  // the children's rank 0 alone prints
    std::vector<unsigned char> a = file_bytes(direct + "/model.bin");
    REQUIRE(!a.empty());
    CHECK(file_bytes(spawned + "/model.bin") == a);
    CHECK(logged_losses(spawned + "/log.jsonl") == logged_losses(direct + "/log.jsonl"));
    // the GPU build's children (emulated, NCCL over MPI): each takes the device of its rank
    // among the children of its node, 0 and 1 of 2, as under mpirun -np 2
    std::string emu = "XWIN_EMU_THREADS=1 XWIN_EMU_DEVICES=2 ", gpu_sft = "build/train_sft_nccl_emu" + fx.common + " -b 2 -d 4";
    std::string gpu_direct = fx.dir("recipe_gpu_direct"), gpu_spawned = fx.dir("recipe_gpu_spawned");
    REQUIRE(run(emu + mpirun + gpu_sft + " -o " + gpu_direct, &out) == 0);
    REQUIRE(run(emu + mpirun + "build/train_dpo_cpu -J \"" + gpu_sft + " -o " + gpu_spawned + "\"", &out) == 0);
    std::vector<unsigned char> g = file_bytes(gpu_direct + "/model.bin");
    REQUIRE(!g.empty());
    CHECK(file_bytes(gpu_spawned + "/model.bin") == g);

    rc = run(mpirun + "build/train_dpo_cpu -J 'echo ${OMPI_COMM_WORLD_SIZE:-none} ${PMIX_RANK:-none} >> " + once + "'", &out);
    REQUIRE(rc == 0);
    CHECK(count_of(out, "   # on rank 0 alone\n") == 1);
    std::vector<unsigned char> text = file_bytes(once);
    CHECK(std::string(text.begin(), text.end()) == "none none\n");

    struct Failure { std::string cmd, status; };
    std::vector<Failure> failures = {
        {"build/train_sft_cpu -Q 1", "exit 1"},
        {sft + " -e " + fx.dir("no_model.bin") + " -o " + fx.dir("recipe_failed"), "exit 1"},
        {"exit 3", "exit 3"},
        {"build/train_sft_missing -h", "cannot run build/train_sft_missing: No such file or directory"},
    };
    for (const Failure& f : failures) {
        auto t0 = std::chrono::steady_clock::now();
        rc = run("timeout -k 10 120 env " + mpirun + "build/train_dpo_cpu -J \"" + f.cmd + "\"", &out);  // a hang fails, not waits
        double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        INFO(f.cmd << "\n" << out);
        CHECK(rc != 0);
        CHECK(took < 60);
        CHECK(count_of(out, "error: the recipe stopped: this command failed (" + f.status + "): " + f.cmd + "\n") == 1);
    }
}

// The recipe's dry run under mpirun says where each stage's command would run, once (rank 0);
// the training programs' batch of 8 is split over the ranks (-b 4), and refused on 3 ranks.
TEST_CASE("the recipe's dry run under mpirun: the data-parallel programs on 2 new ranks with half the batch each, the rest on rank 0 alone", "[parallel][recipe]") {
    std::string mpirun = mpirun2(), dir = scratch("recipe_dry"), out;
    make_dir(dir);
    char cwd[4096];
    REQUIRE(getcwd(cwd, sizeof(cwd)));
    std::string programs = std::string(cwd) + "/build/";
    int rc = run("cd " + dir + " && " + mpirun + programs + "train_dpo_cpu -D 1", &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(count_of(out, "   # on 2 new ranks\n") == 5);  // SFT, the RM's samples and the RM, the Xwin-Set, RS
    CHECK(count_of(out, "   # on rank 0 alone\n") == 9);  // sample -m select, cat, head, python3
    CHECK(count_of(out, "$ " + programs + "train_sft -b 4   # on 2 new ranks\n") == 1);
    CHECK(count_of(out, " -b 4   # on 2 new ranks\n") == 3);  // SFT, the RM, RS
    CHECK(count_of(out, "$ " + programs + "sample -m set -A 8 -T 0.7 -i data/world/rm_prompts.jsonl -o out/xwin_pair/samples.jsonl   # on 2 new ranks\n") == 1);
    CHECK(count_of(out, "$ " + programs + "sample -m select -i out/xwin_pair/samples.jsonl -H 1 -Y 0 -W out/xwin_pair/on_policy_worst.jsonl   # on rank 0 alone\n") == 1);
    CHECK(count_of(out, "$ " + programs + "train_rm -i out/xwin_pair/pairs_train.pairs -b 4   # on 2 new ranks\n") == 1);
    CHECK(count_of(out, "recipe: then DPO (seed 1337) and the stage table") == 1);
    CHECK(!exists(dir + "/out"));
    std::string three = mpirun.replace(mpirun.find(" -np 2 "), 7, " -np 3 ");
    rc = run("cd " + dir + " && " + three + programs + "train_dpo_cpu -D 1", &out);
    CHECK(rc != 0);
    CHECK_THAT(out, Catch::Contains("error: -d: the recipe's batches (8 in its stages, 8 in DPO) do not split over 3 ranks: run it on 1, 2, 4 or 8 ranks"));
    // srun without MPI (-I) cannot spawn ranks: its recipe trains DPO only, and says so first
    rc = run("cd " + dir + " && SLURM_STEP_NUM_TASKS=2 SLURM_PROCID=0 " + programs + "train_dpo_cpu -I " + dir, &out);
    CHECK(rc == 1);
    CHECK(count_of(out, "\n") == 1);
    CHECK_THAT(out, Catch::StartsWith("error: out/sft/model.bin: is missing: ranks without MPI (-I) train DPO only"));
    rm_rf(dir);
}

// The recipe itself under mpirun, its last stage missing: a run folder whose stages before RS
// are there (small models, a small RS token file, arithmetic pairs), the programs beside
// train_dpo as the recipe finds them. The RS stage's train_sft runs on 2 spawned ranks with
// half the batch each and trains what mpirun -np 2 trains, byte for byte; then the same ranks
// (MPI started by the spawn) train DPO with half its batch each, and rank 0 alone writes the
// stage table and the recipe's times.
TEST_CASE("mpirun -np 2 train_dpo: the missing RS stage on 2 spawned ranks, then DPO on the 2 ranks, then rank 0's stage table", "[parallel][recipe]") {
    std::string mpirun = mpirun2(), dir = scratch("recipe_ranks"), direct = scratch("recipe_rs_direct"), out;
    rm_rf(dir), rm_rf(direct);
    char cwd[4096];
    REQUIRE(getcwd(cwd, sizeof(cwd)));
    for (const char* sub : {"/bin", "/out/sft", "/out/rm", "/out/set"}) make_dir(dir + sub);
    REQUIRE(symlink((std::string(cwd) + "/data").c_str(), (dir + "/data").c_str()) == 0);
    REQUIRE(symlink((std::string(cwd) + "/build/train_dpo_cpu").c_str(), (dir + "/bin/train_dpo").c_str()) == 0);
    REQUIRE(symlink((std::string(cwd) + "/build/train_sft_cpu").c_str(), (dir + "/bin/train_sft").c_str()) == 0);
    std::string model = write_small_model("recipe_ranks_model.bin"), rs = write_small_data("recipe_ranks_rs.tok", 20);
    std::string train = write_arith_pairs("recipe_ranks_train", 16, 3), val = write_arith_pairs("recipe_ranks_val", 8, 4);
    write_bytes(dir + "/out/sft/model.bin", file_bytes(model));
    write_bytes(dir + "/out/rm/model.bin", {});
    write_bytes(dir + "/out/set/rs.tok", file_bytes(rs));
    write_bytes(dir + "/out/set/dpo_train.pairs", file_bytes(train));
    write_bytes(dir + "/out/set/dpo_val.pairs", file_bytes(val));
    int rc = run("cd " + dir + " && " + mpirun + dir + "/bin/train_dpo -x 2 -u 1 -v 2", &out);
    INFO(out);
    REQUIRE(rc == 0);
    std::string rs_cmd = dir + "/bin/train_sft -e out/sft/model.bin -i out/set/rs.tok -j '' -o out/rs -x 0 -E 4 -l 1e-4 -u 10 -v 0 -n 0 -s 0 -b 4";
    CHECK(count_of(out, "recipe: stage rs (out/rs/model.bin is missing)") == 1);
    CHECK(count_of(out, "$ " + rs_cmd + "   # on 2 new ranks\n") == 1);
    CHECK(count_of(out, "data parallel: 2 ranks, each 1 micro-batch of 4 per step (total batch 8)") == 2);  // RS, then DPO
    CHECK(count_of(out, "wrote out/report.md, out/report.png and out/curves.png") == 1);
    std::vector<unsigned char> times = file_bytes(dir + "/out/recipe_times.tsv");
    std::string t(times.begin(), times.end());
    CHECK(count_of(t, "\n") == 2);  // rs, dpo: once each
    CHECK(t.rfind("rs\t", 0) == 0);
    CHECK(count_of(t, "\ndpo\t") == 1);
    CHECK(logged_losses(dir + "/out/dpo/log.jsonl").size() == 2);
    // the spawned RS is mpirun -np 2's run of its command
    REQUIRE(run("cd " + dir + " && " + mpirun + cwd + "/build/train_sft_cpu -e out/sft/model.bin -i out/set/rs.tok -j '' -o " + direct +
                    " -x 0 -E 4 -l 1e-4 -u 10 -v 0 -n 0 -s 0 -b 4",
                &out) == 0);
    std::vector<unsigned char> a = file_bytes(direct + "/model.bin");
    REQUIRE(!a.empty());
    CHECK(file_bytes(dir + "/out/rs/model.bin") == a);
    for (const std::string& f : {model, rs, train, val}) remove(f.c_str());
    rm_rf(dir), rm_rf(direct);
}
