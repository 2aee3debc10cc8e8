/*
flash_occupancy: the blocks of the flash attention kernels, as their launchers size them.

  ./flash_occupancy | python3 dev/occupancy.py --arch 90 --ptxas ptxas.log

Prints one line per kernel and padded head size D: "kernel D threads dynamic_shared_bytes",
from llm.cu's own flash_forward_block / flash_backward_block (the launchers' numbers), after a
line "precision BF16" or "precision FP32". It needs no GPU. test/nvcc_gate.sh builds it with
ptxas -v and passes its output and the ptxas log (registers, static shared memory) to
dev/occupancy.py, which computes the resident warps per SM.
*/
#include "../llm.cu"

template <int D>
static void print_blocks() {
    FlashBlock f = flash_forward_block<D>(), b = flash_backward_block<D>();
    // the kernels' addresses keep every instantiation in the program, so that ptxas reports it
    const void* kernels[] = {(const void*)flash_attention_forward_kernel<D>, (const void*)flash_attention_backward_dkdv_kernel<D>,
                             (const void*)flash_attention_backward_dq_kernel<D>};
    printf("flash_attention_forward_kernel %d %d %zu\n", D, f.threads, f.shared);
    printf("flash_attention_backward_dkdv_kernel %d %d %zu\n", D, b.threads, b.shared);
    printf("flash_attention_backward_dq_kernel %d %d %zu\n", D, b.threads, b.shared);
    if (!kernels[0] || !kernels[1] || !kernels[2]) exit(1);
}

int main() {
    printf("precision %s\n", sizeof(floatX) == 2 ? "BF16" : "FP32");
    print_blocks<16>();
    print_blocks<32>();
    print_blocks<64>();
    print_blocks<128>();
    return 0;
}
