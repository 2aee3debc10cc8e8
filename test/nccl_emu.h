// nccl_emu.h - the part of NCCL that llm.cu's collectives use, over MPI, for the CUDA build
// on the CPU (test/cuda_emu.h), so that the GPU program's own rank code (comm_init's NCCL
// setup, the gradients' all-reduce in device memory on the runner's stream) runs in tests
// under mpirun:
// (ZeRO-1's all-gather of the updated weights too):
//   g++ -x c++ -include test/cuda_emu.h -include test/nccl_emu.h -DXWIN_NCCL -DXWIN_MPI train_sft.cu ... -lmpi
// Emulated device memory is host memory and streams are synchronous (cuda_emu.h), so an
// all-reduce is MPI_Allreduce on the buffer, done when the call returns. A communicator is
// MPI_COMM_WORLD's ranks in NCCL's rank order, which comm_init makes the same as MPI's: the
// unique id (a tag) only has to reach every rank, and the ranks and world must be MPI's.
// Each rank is its own process with its own emulated device: run the ranks with
// XWIN_EMU_DEVICES set to at least the ranks per node, so that comm_init's cudaSetDevice of
// the rank's local rank succeeds. A program that joins its ranks without MPI (-I: srun
// without an MPI plugin, NCCL's id through a file) still runs under mpirun here: MPI is this
// emulation's transport, initialised by ncclCommInitRank when the program has not, and ended
// by ncclCommDestroy.
#ifndef XWIN_NCCL_EMU_H
#define XWIN_NCCL_EMU_H

#define XWIN_NCCL_EMULATION 1
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

typedef enum { ncclSuccess = 0, ncclInvalidArgument = 4, ncclInternalError = 3 } ncclResult_t;
typedef enum { ncclInt8 = 0, ncclFloat = 7, ncclDouble = 8 } ncclDataType_t;
typedef enum { ncclSum = 0 } ncclRedOp_t;
typedef struct { char internal[128]; } ncclUniqueId;
struct ncclEmuComm {
    int rank, world;
    bool own_mpi;  // MPI initialised here (the program joined its ranks without it)
};
typedef ncclEmuComm* ncclComm_t;

inline const char* ncclGetErrorString(ncclResult_t r) {
    return r == ncclSuccess ? "no error" : r == ncclInvalidArgument ? "invalid argument (emulated NCCL)" : "internal error (emulated NCCL)";
}

inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    std::memset(id, 0, sizeof(*id));
    std::memcpy(id->internal, "xwin-nccl-emu", 13);
    return ncclSuccess;
}

inline ncclResult_t ncclCommInitRank(ncclComm_t* comm, int world, ncclUniqueId id, int rank) {
    int mpi_rank, mpi_world, initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised && MPI_Init(nullptr, nullptr) != MPI_SUCCESS) return ncclInternalError;
    MPI_Comm_rank(MPI_COMM_WORLD, &mpi_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &mpi_world);
    if (std::memcmp(id.internal, "xwin-nccl-emu", 13) != 0 || world != mpi_world || rank != mpi_rank) return ncclInvalidArgument;
    *comm = new ncclEmuComm{rank, world, !initialised};
    return ncclSuccess;
}

// The all-reduces a rank has run (each call once), and those run inside a group: with
// XWIN_NCCL_EMU_COUNTS set, ncclCommDestroy prints them to stderr, "nccl_emu rank R:
// all-reduces A (G in groups)", so that a test sees the per-layer reductions happen.
inline size_t& nccl_emu_all_reduces() { static size_t n = 0; return n; }
inline size_t& nccl_emu_grouped() { static size_t n = 0; return n; }
inline size_t& nccl_emu_reduces() { static size_t n = 0; return n; }
inline int& nccl_emu_group_depth() { static int d = 0; return d; }

// a group's calls run as they are made (emulated streams are synchronous): the group only nests
inline ncclResult_t ncclGroupStart() {
    nccl_emu_group_depth()++;
    return ncclSuccess;
}

inline ncclResult_t ncclGroupEnd() {
    if (nccl_emu_group_depth() == 0) return ncclInvalidArgument;
    nccl_emu_group_depth()--;
    return ncclSuccess;
}

// float or double sums (the host's collectives over NCCL send doubles)
inline ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    (void)stream;  // emulated streams are synchronous
    if (!comm || (type != ncclFloat && type != ncclDouble) || op != ncclSum) return ncclInvalidArgument;
    nccl_emu_all_reduces()++;
    if (nccl_emu_group_depth() > 0) nccl_emu_grouped()++;
    size_t size = type == ncclFloat ? sizeof(float) : sizeof(double);
    for (size_t i = 0; i < count; i += (size_t)INT_MAX) {
        int n = (int)std::min(count - i, (size_t)INT_MAX);
        const void* s = send == recv ? MPI_IN_PLACE : (const void*)((const char*)send + i * size);
        if (MPI_Allreduce(s, (char*)recv + i * size, n, type == ncclFloat ? MPI_FLOAT : MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS) {
            return ncclInternalError;
        }
    }
    return ncclSuccess;
}

// count bytes of root's send to every rank's recv
inline ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root, ncclComm_t comm, cudaStream_t stream) {
    (void)stream;
    if (!comm || type != ncclInt8 || count > (size_t)INT_MAX || root < 0 || root >= comm->world) return ncclInvalidArgument;
    if (comm->rank == root && send != recv) std::memmove(recv, send, count);
    if (MPI_Bcast(recv, (int)count, MPI_BYTE, root, MPI_COMM_WORLD) != MPI_SUCCESS) return ncclInternalError;
    return ncclSuccess;
}

// send (count floats) summed over the ranks into recv on rank root (recv is not touched elsewhere)
inline ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, int root, ncclComm_t comm,
                               cudaStream_t stream) {
    (void)stream;
    if (!comm || type != ncclFloat || op != ncclSum || root < 0 || root >= comm->world) return ncclInvalidArgument;
    nccl_emu_reduces()++;
    for (size_t i = 0; i < count; i += (size_t)INT_MAX) {
        int n = (int)std::min(count - i, (size_t)INT_MAX);
        bool mine = comm->rank == root;
        const void* s = mine && send == recv ? MPI_IN_PLACE : (const void*)((const float*)send + i);
        if (MPI_Reduce(s, mine ? (float*)recv + i : nullptr, n, MPI_FLOAT, MPI_SUM, root, MPI_COMM_WORLD) != MPI_SUCCESS) return ncclInternalError;
    }
    return ncclSuccess;
}

// rank r's count bytes at recv + r * count (send, or already there when send is that place) to every rank
inline ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type, ncclComm_t comm, cudaStream_t stream) {
    (void)stream;
    if (!comm || type != ncclInt8 || count > (size_t)INT_MAX) return ncclInvalidArgument;
    char* mine = (char*)recv + (size_t)comm->rank * count;
    if (send != mine) std::memmove(mine, send, count);
    if (MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, recv, (int)count, MPI_BYTE, MPI_COMM_WORLD) != MPI_SUCCESS) return ncclInternalError;
    return ncclSuccess;
}

inline ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (getenv("XWIN_NCCL_EMU_COUNTS") && comm) {
        fprintf(stderr, "nccl_emu rank %d: all-reduces %zu (%zu in groups), reduces %zu%s\n", comm->rank, nccl_emu_all_reduces(), nccl_emu_grouped(),
                nccl_emu_reduces(), comm->own_mpi ? "; the program did not initialise MPI" : "");
    }
    bool own_mpi = comm && comm->own_mpi;
    delete comm;
    if (own_mpi) MPI_Finalize();
    return ncclSuccess;
}

#endif  // XWIN_NCCL_EMU_H
