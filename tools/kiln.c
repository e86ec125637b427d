/*
 * kiln.c — the `kiln` command: dispatches to one subcommand per job. Built
 * on kiln.h only (through tools/cli.h); each family lives in
 * tools/cmd_<family>.c.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct command {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} command;

static void usage(FILE *f, const command *cmds)
{
    fprintf(f, "kiln %s — train, tune, compress and serve causal language models\n\n",
            KILN_VERSION);
    fprintf(f, "usage: kiln <command> [flags]   (kiln <command> --help for its flags)\n\ncommands:\n");
    for (const command *c = cmds; c->name; c++)
        if (c->fn) fprintf(f, "  %-10s %s\n", c->name, c->help);
}

/* The inference commands (generate, chat, serve) wait passively between
 * OpenMP regions. libgomp's default is to spin for a while, which
 * collapses decoding when another process shares the cores: on 2 vCPUs
 * with one busy process beside it, `kiln generate --threads 2` fell from
 * ~320 to ~37 tokens/s, against ~240 with OMP_WAIT_POLICY=passive, which
 * costs nothing measurable when the cores are free (docs/serving.md).
 * libgomp reads the variable when it is loaded, before main, so it is set
 * here and the program executed again; the variable itself marks the
 * second run. A user's own OMP_WAIT_POLICY, GOMP_SPINCOUNT or
 * KMP_BLOCKTIME is left alone. (The library reads no environment; this is
 * the command's choice.) */
static void wait_passively(char **argv)
{
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("KMP_BLOCKTIME")) return;
    if (setenv("OMP_WAIT_POLICY", "passive", 1)) return;
    execv("/proc/self/exe", argv);
    unsetenv("OMP_WAIT_POLICY"); /* no re-exec: go on with the default */
}

int main(int argc, char **argv)
{
    static const command cmds[] = {
#define XX(name, help) {#name, cmd_##name, help},
        KILN_COMMANDS(XX)
#undef XX
        {NULL, NULL, NULL}};
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        usage(stdout, cmds);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        printf("kiln %s\n", KILN_VERSION);
        return 0;
    }
    for (const command *c = cmds; c->name; c++) {
        if (strcmp(c->name, argv[1]) != 0) continue;
        if (!c->fn) {
            fprintf(stderr, "kiln: '%s' is not available in this build of kiln %s\n",
                    c->name, KILN_VERSION);
            return 2;
        }
        if (!strcmp(c->name, "generate") || !strcmp(c->name, "chat") ||
            !strcmp(c->name, "serve"))
            wait_passively(argv);
        return c->fn(argc - 1, argv + 1);
    }
    fprintf(stderr, "kiln: unknown command '%s'\n\n", argv[1]);
    usage(stderr, cmds);
    return 2;
}
