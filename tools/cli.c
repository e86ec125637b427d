/*
 * cli.c — the long-flag parser shared by all subcommands.
 */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *kind_arg(cli_kind k)
{
    switch (k) {
    case CLI_STR: return " VALUE";
    case CLI_INT:
    case CLI_I64: return " N";
    case CLI_F64: return " X";
    case CLI_BOOL: return "";
    case CLI_LIST: return " A [B ...]";
    case CLI_OPTSTR: return " [VALUE]";
    }
    return "";
}

static void print_help(const char *cmd, const char *usage, const char *about,
                       const cli_opt *opts)
{
    printf("usage: kiln %s\n", usage);
    if (about && *about) printf("\n%s\n", about);
    printf("\noptions:\n");
    for (const cli_opt *o = opts; o->name; o++) {
        char left[96];
        snprintf(left, sizeof left, "--%s%s", o->name, kind_arg(o->kind));
        printf("  %-28s %s%s\n", left, o->help ? o->help : "",
               o->required ? " (required)" : "");
    }
    printf("  %-28s %s\n", "--help", "show this help");
    (void)cmd;
}

#define KILN_CLI_MAX_THREADS 1024
#define KILN_CLI_MAX_THREADS_STR "1024"

static int bad(const char *cmd, const char *flag, const char *val,
               const char *want)
{
    fprintf(stderr, "kiln %s: --%s: '%s' is not %s (see kiln %s --help)\n",
            cmd, flag, val, want, cmd);
    return 2;
}

static int set_value(const char *cmd, const cli_opt *o, const char *v)
{
    char *end;
    errno = 0;
    switch (o->kind) {
    case CLI_STR:
    case CLI_OPTSTR:
        *(const char **)o->dst = v;
        return 0;
    case CLI_INT: {
        long x = strtol(v, &end, 10);
        if (errno || *end || end == v || x < -2147483647L || x > 2147483647L)
            return bad(cmd, o->name, v, "an integer");
        /* every --threads flag sizes OpenMP teams and per-thread buffers:
         * an absurd count crashes the runtime, a negative one was silently
         * read as "all cores" */
        if (!strcmp(o->name, "threads") && (x < 0 || x > KILN_CLI_MAX_THREADS))
            return bad(cmd, o->name, v,
                       "0 (all cores) or a thread count from 1 to "
                       KILN_CLI_MAX_THREADS_STR);
        /* --ctx (generate, chat, serve): 0 is the model's context, a
         * negative one was silently read as 0 */
        if (!strcmp(o->name, "ctx") && x < 0)
            return bad(cmd, o->name, v, "0 (the model's context) or a positive length");
        *(int *)o->dst = (int)x;
        return 0;
    }
    case CLI_I64: {
        long long x = strtoll(v, &end, 10);
        if (errno || *end || end == v) return bad(cmd, o->name, v, "an integer");
        *(int64_t *)o->dst = x;
        return 0;
    }
    case CLI_F64: {
        double x = strtod(v, &end);
        if (errno || *end || end == v || !isfinite(x))
            return bad(cmd, o->name, v, "a finite number");
        *(double *)o->dst = x;
        return 0;
    }
    default: return 0;
    }
}

int cli_parse(const char *cmd, const char *usage, const char *about,
              cli_opt *opts, int argc, char **argv, cli_list *pos)
{
    if (pos) {
        pos->items = calloc((size_t)argc + 1, sizeof(char *));
        pos->n = 0;
    }
    for (cli_opt *o = opts; o->name; o++)
        if (o->kind == CLI_LIST) {
            cli_list *l = o->dst;
            l->items = calloc((size_t)argc + 1, sizeof(char *));
            l->n = 0;
        }
    bool *seen = calloc(64, sizeof(bool));
    int nopts = 0;
    while (opts[nopts].name) nopts++;
    bool *seen_big = nopts > 64 ? calloc((size_t)nopts, sizeof(bool)) : NULL;
    if (seen_big) { free(seen); seen = seen_big; }

    int rc = 0;
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            print_help(cmd, usage, about, opts);
            rc = 1;
            break;
        }
        if (strncmp(a, "--", 2) != 0 || a[2] == 0) {
            if (!pos) {
                fprintf(stderr,
                        "kiln %s: unexpected argument '%s' (see kiln %s --help)\n",
                        cmd, a, cmd);
                rc = 2;
                break;
            }
            pos->items[pos->n++] = a;
            continue;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        cli_opt *o = NULL;
        int idx = 0;
        for (cli_opt *p = opts; p->name; p++, idx++)
            if (strlen(p->name) == nlen && !strncmp(p->name, name, nlen)) {
                o = p;
                break;
            }
        if (!o) {
            fprintf(stderr, "kiln %s: unknown flag '--%.*s' (see kiln %s --help)\n",
                    cmd, (int)nlen, name, cmd);
            rc = 2;
            break;
        }
        seen[idx] = true;
        if (o->kind == CLI_BOOL) {
            if (eq) {
                if (!strcmp(eq + 1, "true") || !strcmp(eq + 1, "1")) *(bool *)o->dst = true;
                else if (!strcmp(eq + 1, "false") || !strcmp(eq + 1, "0")) *(bool *)o->dst = false;
                else { rc = bad(cmd, o->name, eq + 1, "true or false"); }
            } else {
                *(bool *)o->dst = true;
            }
            continue;
        }
        if (o->kind == CLI_LIST) {
            cli_list *l = o->dst;
            if (eq) l->items[l->n++] = eq + 1;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
                l->items[l->n++] = argv[++i];
            if (l->n == 0) {
                fprintf(stderr, "kiln %s: --%s needs at least one value\n", cmd, o->name);
                rc = 2;
            }
            continue;
        }
        if (o->kind == CLI_OPTSTR) {
            if (eq) rc = set_value(cmd, o, eq + 1);
            else if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
                rc = set_value(cmd, o, argv[++i]);
            else *(const char **)o->dst = "";
            continue;
        }
        const char *v;
        if (eq) v = eq + 1;
        else if (i + 1 < argc) v = argv[++i];
        else {
            fprintf(stderr, "kiln %s: --%s needs a value (see kiln %s --help)\n",
                    cmd, o->name, cmd);
            rc = 2;
            break;
        }
        rc = set_value(cmd, o, v);
    }
    if (rc == 0) {
        int idx = 0;
        for (cli_opt *o = opts; o->name; o++, idx++)
            if (o->required && !seen[idx]) {
                fprintf(stderr, "kiln %s: --%s is required (see kiln %s --help)\n",
                        cmd, o->name, cmd);
                rc = 2;
                break;
            }
    }
    free(seen);
    return rc;
}

void cli_free(cli_opt *opts, cli_list *pos)
{
    for (cli_opt *o = opts; o->name; o++)
        if (o->kind == CLI_LIST) {
            cli_list *l = o->dst;
            free(l->items);
            l->items = NULL;
            l->n = 0;
        }
    if (pos) {
        free(pos->items);
        pos->items = NULL;
        pos->n = 0;
    }
}

int cli_fail(kiln_ctx *ctx, const char *cmd, kiln_status s)
{
    const char *m = kiln_errmsg(ctx);
    fprintf(stderr, "kiln %s: %s\n", cmd, (m && *m) ? m : kiln_status_str(s));
    return 1;
}

bool cli_isatty(void) { return isatty(STDOUT_FILENO) != 0; }

kiln_status cli_model_dir(kiln_ctx *ctx, const char *model, char *out, size_t cap)
{
    snprintf(out, cap, "%s", model);
    char cfgp[4200], lp[4200];
    struct stat st;
    snprintf(cfgp, sizeof cfgp, "%s/config.json", model);
    snprintf(lp, sizeof lp, "%s/latest", model);
    if (stat(cfgp, &st) != 0 && stat(lp, &st) == 0)
        return kiln_checkpoint_resolve(ctx, model, out, cap);
    return KILN_OK;
}

bool cli_weight_dtype(const char *cmd, const char *s, kiln_dtype *out)
{
    static const struct {
        const char *name;
        kiln_dtype t;
    } k[] = {{"fp32", KILN_DTYPE_F32}, {"f32", KILN_DTYPE_F32}, {"bf16", KILN_DTYPE_BF16},
             {"q8_0", KILN_DTYPE_Q8_0}, {"q4_0", KILN_DTYPE_Q4_0}, {"q4_k", KILN_DTYPE_Q4_K},
             {"q6_k", KILN_DTYPE_Q6_K}};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        if (!strcmp(s, k[i].name)) {
            *out = k[i].t;
            return true;
        }
    fprintf(stderr, "kiln %s: --dtype '%s' is not one of %s\n", cmd, s, CLI_WEIGHT_DTYPES);
    return false;
}
