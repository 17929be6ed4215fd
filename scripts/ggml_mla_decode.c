// One decode step of one layer's attention in ggml on the CPU, op by op, as llama.cpp 0.3.36's deepseek2 graph
// builds it (src/llama-graph.cpp build_attn_mha, MLA: one KV "head" of D = r + d_rope values, V a view of its first
// R = r values), beside the same heads packed as the columns of one matrix product, and MHA of the same heads.
// Built and run by scripts/llama_cpp_mla_kernels.py against the llama.cpp venv's libggml.
// usage: ggml_mla_decode N_KV HEADS D R THREADS [REPEATS] [MHA_HEAD_DIM]   (times: the best of REPEATS, ms)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ggml.h"
#include "ggml-cpu.h"

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static double best_of(struct ggml_context * ctx, struct ggml_tensor * out, int threads, int reps) {
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    double best = 1e9;
    for (int i = 0; i < reps + 1; i++) {
        double t = now();
        ggml_graph_compute_with_ctx(ctx, gf, threads);
        t = now() - t;
        if (i > 0 && t < best) best = t;
    }
    return best;
}

static void fill(struct ggml_tensor * t) {
    size_t n = ggml_nelements(t);
    if (t->type == GGML_TYPE_F32) { float * d = t->data; for (size_t i = 0; i < n; i++) d[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f; }
    else { ggml_fp16_t * d = t->data; for (size_t i = 0; i < n; i++) d[i] = ggml_fp32_to_fp16((float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f); }
}

int main(int argc, char ** argv) {
    int n_kv = atoi(argv[1]), H = atoi(argv[2]), D = atoi(argv[3]), R = atoi(argv[4]), threads = atoi(argv[5]);
    int reps = argc > 6 ? atoi(argv[6]) : 5;
    int d_head = argc > 7 ? atoi(argv[7]) : 128;   // the MHA comparison's head size
    size_t mem = (size_t)n_kv * (D * 2 * 4 + H * 4 * 8 + 2 * H * d_head * 2) + (size_t)512 * 1024 * 1024;
    struct ggml_init_params ip = { mem, NULL, false };
    struct ggml_context * ctx = ggml_init(ip);
    // MLA: one cache row of D = r + d_rope f16 values per token; V = its first R values (a view)
    struct ggml_tensor * k = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, D, n_kv); fill(k);
    struct ggml_tensor * q_b = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, 1, H); fill(q_b);   // llama.cpp: heads in dim 2
    struct ggml_tensor * q_p = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D, H); fill(q_p);      // packed: heads as columns
    struct ggml_tensor * v = ggml_view_2d(ctx, k, R, n_kv, k->nb[1], 0);
    struct ggml_tensor * vt = ggml_cont(ctx, ggml_transpose(ctx, v));                         // llama.cpp's v_cont
    struct ggml_tensor * vt_data = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, R); fill(vt_data);
    struct ggml_tensor * w_b = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_kv, 1, H); fill(w_b);
    struct ggml_tensor * w_p = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, H); fill(w_p);
    double t_kq_b = best_of(ctx, ggml_mul_mat(ctx, k, q_b), threads, reps);
    double t_kq_p = best_of(ctx, ggml_mul_mat(ctx, k, q_p), threads, reps);
    double t_cont = best_of(ctx, vt, threads, reps);
    double t_kqv_b = best_of(ctx, ggml_mul_mat(ctx, vt_data, w_b), threads, reps);
    double t_kqv_p = best_of(ctx, ggml_mul_mat(ctx, vt_data, w_p), threads, reps);
    // flash attention as llama.cpp calls it: q [D, 1 token, H], k [D, n_kv, 1], v a view of k [R, n_kv, 1]
    struct ggml_tensor * k3 = ggml_reshape_3d(ctx, k, D, n_kv, 1);
    struct ggml_tensor * v3 = ggml_view_3d(ctx, k, R, n_kv, 1, k->nb[1], k->nb[2], 0);
    struct ggml_tensor * fa = ggml_flash_attn_ext(ctx, q_b, k3, v3, NULL, 1.0f / 24.0f, 0.0f, 0.0f);
    ggml_prec_set_acc(fa, GGML_PREC_F32);
    double t_fa = best_of(ctx, fa, threads, reps);
    // MHA of the same heads for comparison: per head its own K and V^T (f16), head size d_head
    struct ggml_tensor * km = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d_head, n_kv, H); fill(km);
    struct ggml_tensor * qm = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d_head, 1, H); fill(qm);
    struct ggml_tensor * vm = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, n_kv, d_head, H); fill(vm);
    double t_mha_kq = best_of(ctx, ggml_mul_mat(ctx, km, qm), threads, reps);
    double t_mha_kqv = best_of(ctx, ggml_mul_mat(ctx, vm, w_b), threads, reps);
    double fl_kq = 2.0 * D * n_kv * H, fl_kqv = 2.0 * R * n_kv * H, mb = 1.0 / (1 << 20);
    printf("{\"n_kv\": %d, \"heads\": %d, \"D\": %d, \"R\": %d, \"threads\": %d, \"latent_mib\": %.3f,\n", n_kv, H, D, R, threads, (double)ggml_nbytes(k) * mb);
    printf(" \"kq_heads_in_dim2_ms\": %.4f, \"kq_heads_packed_ms\": %.4f, \"kq_gflops_dim2\": %.2f, \"kq_gflops_packed\": %.2f,\n", 1e3*t_kq_b, 1e3*t_kq_p, fl_kq/t_kq_b/1e9, fl_kq/t_kq_p/1e9);
    printf(" \"v_cont_ms\": %.4f, \"kqv_heads_in_dim2_ms\": %.4f, \"kqv_heads_packed_ms\": %.4f, \"kqv_gflops_dim2\": %.2f, \"kqv_gflops_packed\": %.2f,\n", 1e3*t_cont, 1e3*t_kqv_b, 1e3*t_kqv_p, fl_kqv/t_kqv_b/1e9, fl_kqv/t_kqv_p/1e9);
    printf(" \"flash_attn_ms\": %.4f, \"flash_attn_gflops\": %.2f, \"mha_kq_ms\": %.4f, \"mha_kqv_ms\": %.4f, \"mha_kv_mib\": %.3f}\n", 1e3*t_fa, (fl_kq+fl_kqv)/t_fa/1e9, 1e3*t_mha_kq, 1e3*t_mha_kqv, 2.0*ggml_nbytes(km)*mb);
    ggml_free(ctx);
    return 0;
}
