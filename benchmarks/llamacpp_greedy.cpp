// Greedy decoding from a prompt of token ids, for checking a GGUF against k2serve on the same weights.
//
//   llama-k2serve-greedy MODEL.gguf N_PREDICT THREADS LOGITS_OUT ID,ID,ID,... [KV_TYPE]
//
// Evaluates the prompt (token ids, no tokenizer involved), writes the float32 logits of its last
// position to LOGITS_OUT (n_vocab floats, native endianness), then decodes N_PREDICT tokens greedily
// and prints them on one line: "greedy: ID ID ...". KV_TYPE is the KV cache's type, f16 (llama.cpp's
// default, flash attention as llama.cpp decides) or f32 (KV cache f32 and flash attention off: the CPU
// flash-attention kernel rounds K and V to f16, so an f32 GGUF is compared with an fp32 reference
// without any f16 rounding). Built by benchmarks/bench_llamacpp.py against the
// llama.cpp build (it follows examples/simple/simple.cpp of the same source tree).

#include "llama.h"

#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static void set_tokens(llama_batch_ext * batch, const llama_token * tokens, int32_t n, llama_pos pos_0) {
    llama_batch_ext_clear(batch);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = pos_0 + i;
        llama_batch_ext_set_pos(batch, idx, &pos);
    }
    llama_batch_ext_set_output_logits(batch, n - 1, true);
}

static int argmax(const float * logits, int n_vocab) {
    int best = 0;
    for (int i = 1; i < n_vocab; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: %s MODEL.gguf N_PREDICT THREADS LOGITS_OUT ID,ID,... [f16|f32]\n", argv[0]);
        return 2;
    }
    const std::string model_path = argv[1];
    const int n_predict = std::atoi(argv[2]);
    const int n_threads = std::atoi(argv[3]);
    const std::string logits_out = argv[4];
    std::vector<llama_token> prompt;
    {
        std::stringstream ss(argv[5]);
        std::string item;
        while (std::getline(ss, item, ',')) {
            prompt.push_back(std::atoi(item.c_str()));
        }
    }
    const std::string kv_type = argc == 7 ? argv[6] : "f16";
    if (kv_type != "f16" && kv_type != "f32") {
        fprintf(stderr, "error: KV_TYPE must be f16 or f32, got %s\n", kv_type.c_str());
        return 2;
    }
    if (prompt.empty() || n_predict < 1 || n_threads < 1) {
        fprintf(stderr, "error: need a non-empty prompt, N_PREDICT >= 1 and THREADS >= 1\n");
        return 2;
    }

    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), model_params);
    if (model == NULL) {
        fprintf(stderr, "error: unable to load %s\n", model_path.c_str());
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_ctx = prompt.size() + n_predict + 1;
    ctx_params.n_batch = prompt.size();
    ctx_params.n_threads = n_threads;
    ctx_params.n_threads_batch = n_threads;
    ctx_params.type_k = kv_type == "f32" ? GGML_TYPE_F32 : GGML_TYPE_F16;
    ctx_params.type_v = ctx_params.type_k;
    if (kv_type == "f32") {
        ctx_params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    llama_context * ctx = llama_init_from_model(model, ctx_params);
    if (ctx == NULL) {
        fprintf(stderr, "error: failed to create the llama_context\n");
        return 1;
    }

    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    set_tokens(batch, prompt.data(), prompt.size(), 0);
    llama_pos n_pos = 0;
    int n_tokens = prompt.size();
    std::vector<llama_token> out;
    for (int step = 0; step < n_predict; ++step) {
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) {
            fprintf(stderr, "error: decode failed at step %d\n", step);
            return 1;
        }
        n_pos += n_tokens;
        const float * logits = llama_get_logits_ith(ctx, -1);
        if (step == 0) {
            FILE * f = std::fopen(logits_out.c_str(), "wb");
            if (f == NULL || std::fwrite(logits, sizeof(float), n_vocab, f) != (size_t) n_vocab) {
                fprintf(stderr, "error: cannot write %s\n", logits_out.c_str());
                return 1;
            }
            std::fclose(f);
        }
        llama_token next = argmax(logits, n_vocab);
        out.push_back(next);
        set_tokens(batch, &next, 1, n_pos);
        n_tokens = 1;
    }
    printf("greedy:");
    for (llama_token t : out) {
        printf(" %d", t);
    }
    printf("\n");

    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
