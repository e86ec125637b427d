/*
 * bench_cpu.h — the line every benchmark prints first (docs/performance.md
 * keeps one table per CPU kind): the CPU's model name from /proc/cpuinfo,
 * its mixed-precision features and the kernels kiln picks on it.
 */
#ifndef KILN_BENCH_CPU_H
#define KILN_BENCH_CPU_H

#include "kernels/kernels.h"

#include <stdio.h>
#include <string.h>

/* "cpu: MODEL NAME; FEATURES; fp32 GEMM NAME" on stdout. */
static void bench_print_cpu(void)
{
    char name[256] = "unknown CPU", line[512], caps[256];
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        while (fgets(line, sizeof line, f)) {
            const char *v = strchr(line, ':');
            if (strncmp(line, "model name", 10) || !v) continue;
            for (v++; *v == ' ' || *v == '\t'; v++) {}
            snprintf(name, sizeof name, "%s", v);
            name[strcspn(name, "\r\n")] = 0;
            break;
        }
        fclose(f);
    }
    kern_cpu_describe(caps, sizeof caps);
    kern_gemm *g = kern_gemm_fast_new();
    printf("cpu: %s; %s; fp32 GEMM %s; avx512 %s\n", name, caps + (strncmp(caps, "cpu: ", 5) ? 0 : 5),
           g ? g->name : "?", kern_cpu_avx512() ? "yes" : "no");
    kern_gemm_free(g);
    fflush(stdout);
}

#endif
