/*
 * reward.c — verifiable rewards for GRPO: the final answer after a marker
 * ("####", \boxed{}), exact and numeric comparison with the reference
 * answer, a regex format reward, and an external checker program (JSONL
 * on its stdin, one number per line on its stdout, under a timeout), in a
 * weighted sum parsed from a spec such as "exact:1,regex:0.2".
 *
 * The external program is the user's code: anything it does wrong (exit
 * status, signal, hang, wrong line count, a line that is not a number) is
 * reported and handled by the rule kiln.h states, never a crash or a hang
 * of the run.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "kiln.h"
#include "base/base.h"

#include <ctype.h>
#include <pthread.h>
#include <stdarg.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pcre2.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { TERM_EXACT, TERM_NUMERIC, TERM_REGEX, TERM_CMD, MAX_TERMS = 8 };
static const char *const term_names[] = {"exact", "numeric", "regex", "cmd"};

struct kiln_reward {
    kiln_reward_opts o;
    int n;
    int kind[MAX_TERMS];
    double weight[MAX_TERMS];
    pcre2_code *re;
    pcre2_match_data *md;
    char *cmd;
};

#define DEFAULT_REGEX "####\\s*-?[0-9][0-9,.]*\\s*$"

kiln_reward_opts kiln_reward_opts_default(void)
{
    return (kiln_reward_opts){.spec = "exact", .tolerance = 1e-6, .regex = NULL, .cmd = NULL,
                              .cmd_timeout = 60};
}

/* ---- answers ---------------------------------------------------------- */

static void trim(const char **p, size_t *n)
{
    while (*n && isspace((unsigned char)**p)) (*p)++, (*n)--;
    while (*n && isspace((unsigned char)(*p)[*n - 1])) (*n)--;
}

/* The content of the last \boxed{...} with balanced braces, or NULL. */
static const char *last_boxed(const char *text, size_t *len)
{
    const char *found = NULL, *p = text;
    size_t flen = 0;
    while ((p = strstr(p, "\\boxed{")) != NULL) {
        const char *b = p + 7, *q = b;
        int depth = 1;
        while (*q && depth) {
            depth += *q == '{';
            depth -= *q == '}';
            if (depth) q++;
        }
        if (depth == 0) {
            found = b;
            flen = (size_t)(q - b);
        }
        p = b;
    }
    *len = flen;
    return found;
}

const char *kiln_answer_extract(const char *text, size_t *len)
{
    *len = 0;
    if (!text) return NULL;
    const char *m = NULL, *p = text;
    while ((p = strstr(p, "####")) != NULL) m = p, p += 4;
    const char *a;
    size_t n;
    if (m) {
        a = m + 4;
        while (*a == '#') a++; /* "#####" still means the marker */
        const char *nl = strchr(a, '\n');
        n = nl ? (size_t)(nl - a) : strlen(a);
    } else if (!(a = last_boxed(text, &n)))
        return NULL;
    trim(&a, &n);
    *len = n;
    return a;
}

/* A number as people write answers: commas, a leading '$' and a trailing
 * '.' or '%' allowed. */
static bool parse_number(const char *s, size_t n, double *out)
{
    char buf[128];
    size_t k = 0;
    trim(&s, &n);
    if (n && *s == '$') s++, n--;
    while (n && (s[n - 1] == '.' || s[n - 1] == '%')) n--;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ',') continue;
        if (k + 1 >= sizeof buf) return false;
        buf[k++] = s[i];
    }
    buf[k] = 0;
    if (!k) return false;
    char *end;
    errno = 0;
    double v = strtod(buf, &end);
    if (*end || errno || !isfinite(v)) return false;
    *out = v;
    return true;
}

static float score_exact(const char *completion, const char *answer)
{
    size_t n, na;
    const char *a = kiln_answer_extract(completion, &n);
    if (!a || !answer) return 0;
    na = strlen(answer);
    trim(&answer, &na);
    if (n == na && !memcmp(a, answer, n)) return 1;
    double x, y;
    return parse_number(a, n, &x) && parse_number(answer, na, &y) && x == y ? 1.0f : 0.0f;
}

static float score_numeric(const char *completion, const char *answer, double tol)
{
    size_t n;
    const char *a = kiln_answer_extract(completion, &n);
    double x, y;
    if (!a || !answer || !parse_number(a, n, &x) || !parse_number(answer, strlen(answer), &y))
        return 0;
    return fabs(x - y) <= tol * fmax(1.0, fabs(y)) ? 1.0f : 0.0f;
}

static float score_regex(kiln_reward *r, const char *completion)
{
    int rc = pcre2_match(r->re, (PCRE2_SPTR)completion, strlen(completion), 0, 0, r->md, NULL);
    return rc >= 0 ? 1.0f : 0.0f;
}

/* ---- the spec --------------------------------------------------------- */

static kiln_status parse_spec(kiln_ctx *ctx, kiln_reward *r, const char *spec)
{
    const char *p = spec;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        char item[64];
        if (len == 0 || len >= sizeof item)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_reward_opts.spec = '%s': an empty or overlong term; write "
                             "NAME[:WEIGHT],... with NAME exact, numeric, regex or cmd", spec);
        memcpy(item, p, len);
        item[len] = 0;
        char *colon = strchr(item, ':');
        double w = 1;
        if (colon) {
            *colon = 0;
            char *end;
            w = strtod(colon + 1, &end);
            if (end == colon + 1 || *end || !isfinite(w))
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "kiln_reward_opts.spec = '%s': weight '%s' of %s is not a "
                                 "number", spec, colon + 1, item);
        }
        int k = -1;
        for (int i = 0; i < 4; i++)
            if (!strcmp(item, term_names[i])) k = i;
        if (k < 0)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_reward_opts.spec = '%s': unknown reward '%s' (exact, "
                             "numeric, regex or cmd)", spec, item);
        for (int i = 0; i < r->n; i++)
            if (r->kind[i] == k)
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "kiln_reward_opts.spec = '%s': '%s' is listed twice", spec, item);
        if (r->n == MAX_TERMS)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_reward_opts.spec: too many terms");
        r->kind[r->n] = k;
        r->weight[r->n++] = w;
        p += len + (e ? 1 : 0);
        if (e && !*p)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_reward_opts.spec = '%s' ends with a comma", spec);
    }
    if (r->n == 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_reward_opts.spec is empty");
    return KILN_OK;
}

static bool has_term(const kiln_reward *r, int kind)
{
    for (int i = 0; i < r->n; i++)
        if (r->kind[i] == kind) return true;
    return false;
}

kiln_status kiln_reward_new(kiln_ctx *ctx, const kiln_reward_opts *opts, kiln_reward **out)
{
    *out = NULL;
    kiln_reward_opts o = opts ? *opts : kiln_reward_opts_default();
    if (!o.spec) o.spec = "exact";
    if (!(o.tolerance >= 0 && isfinite(o.tolerance)))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_reward_opts.tolerance = %g must be >= 0", o.tolerance);
    if (!(o.cmd_timeout > 0 && o.cmd_timeout <= 1e6))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_reward_opts.cmd_timeout = %g must be in (0, 1e6] seconds",
                         o.cmd_timeout);
    kiln_reward *r = kiln_calloc(ctx, 1, sizeof *r);
    if (!r) return KILN_ERR_NOMEM;
    r->o = o;
    kiln_status s = parse_spec(ctx, r, o.spec);
    if (!s && o.cmd && *o.cmd && !has_term(r, TERM_CMD) && r->n < MAX_TERMS) {
        r->kind[r->n] = TERM_CMD; /* a command given means it counts, weight 1 */
        r->weight[r->n++] = 1;
    }
    if (!s && has_term(r, TERM_CMD) && (!o.cmd || !*o.cmd))
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "kiln_reward_opts.spec names cmd but kiln_reward_opts.cmd is not set");
    if (!s && o.cmd && !(r->cmd = strdup(o.cmd))) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!s && has_term(r, TERM_REGEX)) {
        const char *pat = o.regex && *o.regex ? o.regex : DEFAULT_REGEX;
        int err;
        PCRE2_SIZE off;
        r->re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF, &err, &off, NULL);
        if (!r->re) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(err, msg, sizeof msg);
            s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                          "kiln_reward_opts.regex = '%s': %s at offset %zu", pat, (char *)msg,
                          (size_t)off);
        } else if (!(r->md = pcre2_match_data_create_from_pattern(r->re, NULL)))
            s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    if (s) {
        kiln_reward_free(r);
        return s;
    }
    r->o.cmd = r->cmd;
    r->o.spec = NULL; /* borrowed strings are not kept */
    r->o.regex = NULL;
    *out = r;
    return KILN_OK;
}

void kiln_reward_free(kiln_reward *r)
{
    if (!r) return;
    pcre2_match_data_free(r->md);
    pcre2_code_free(r->re);
    free(r->cmd);
    free(r);
}

int kiln_reward_n_terms(const kiln_reward *r) { return r->n; }

const char *kiln_reward_term_name(const kiln_reward *r, int i)
{
    return i >= 0 && i < r->n ? term_names[r->kind[i]] : "?";
}

/* ---- the external program --------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

static bool sb_add(sbuf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t c = (b->n + n + 1) * 2;
        char *q = realloc(b->p, c);
        if (!q) return false;
        b->p = q;
        b->cap = c;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return true;
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void why(kiln_reward_report *rep, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void why(kiln_reward_report *rep, const char *fmt, ...)
{
    if (rep->why[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rep->why, sizeof rep->why, fmt, ap);
    va_end(ap);
}

/* Feeds input to the program and collects its stdout until it closes it,
 * under the deadline. Returns 0 when it exited 0, 1 for a failure
 * described in rep, -1 when it could not be started (message on ctx). */
static int run_cmd(kiln_ctx *ctx, const kiln_reward *r, const sbuf *input, sbuf *output,
                   kiln_reward_report *rep)
{
    int in[2], outp[2];
    if (pipe2(in, O_CLOEXEC)) goto nopipe;
    if (pipe2(outp, O_CLOEXEC)) {
        close(in[0]);
        close(in[1]);
        goto nopipe;
    }
    pid_t pid = fork();
    if (pid < 0) {
        close(in[0]); close(in[1]); close(outp[0]); close(outp[1]);
        kiln_fail(ctx, KILN_ERR_IO, "kiln_reward_opts.cmd: cannot start '%s': fork: %s", r->cmd,
                  strerror(errno));
        return -1;
    }
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(outp[1], 1);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL); /* the checker gets default signals */
        signal(SIGPIPE, SIG_DFL);
        execl("/bin/sh", "sh", "-c", r->cmd, (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(outp[1]);
    /* writing to a program that stopped reading must not kill kiln */
    sigset_t pipe_set, old;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    fcntl(in[1], F_SETFL, O_NONBLOCK);
    size_t sent = 0;
    int wfd = input->n ? in[1] : -1;
    if (wfd < 0) close(in[1]);
    double deadline = now_s() + r->o.cmd_timeout;
    bool timed_out = false, oom = false;
    char buf[65536];
    for (;;) {
        struct pollfd pf[2] = {{outp[0], POLLIN, 0}, {wfd, POLLOUT, 0}};
        double left = deadline - now_s();
        if (left <= 0) {
            timed_out = true;
            break;
        }
        int rc = poll(pf, wfd >= 0 ? 2 : 1, (int)(left * 1000) + 1);
        if (rc < 0 && errno == EINTR) continue;
        if (rc < 0) break;
        if (wfd >= 0 && (pf[1].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = write(wfd, input->p + sent, input->n - sent);
            if (w > 0) sent += (size_t)w;
            if ((w < 0 && errno != EAGAIN && errno != EINTR) || sent == input->n) {
                close(wfd); /* done, or it closed its stdin: EOF either way */
                wfd = -1;
            }
        }
        if (pf[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t k = read(outp[0], buf, sizeof buf);
            if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (k <= 0) break; /* its stdout closed */
            if (output->n < ((size_t)64 << 20) && !sb_add(output, buf, (size_t)k)) {
                oom = true;
                break;
            }
        }
    }
    if (wfd >= 0) close(wfd);
    close(outp[0]);
    int status = 0;
    if (timed_out || oom) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    } else {
        /* stdout closed: it is ending; still bounded by the deadline */
        while (waitpid(pid, &status, WNOHANG) == 0) {
            if (now_s() > deadline) {
                timed_out = true;
                kill(pid, SIGKILL);
                waitpid(pid, &status, 0);
                break;
            }
            struct timespec ts = {0, 2000000};
            nanosleep(&ts, NULL);
        }
    }
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, NULL, &zero) > 0) {} /* drop our own EPIPE's signal */
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (oom) {
        kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory reading the reward command's output");
        return -1;
    }
    if (timed_out) {
        why(rep, "reward command timed out after %g s (kiln_reward_opts.cmd_timeout) and was "
                 "killed", r->o.cmd_timeout);
        return 1;
    }
    if (WIFSIGNALED(status)) {
        why(rep, "reward command was killed by signal %d (%s)", WTERMSIG(status),
            strsignal(WTERMSIG(status)));
        return 1;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0) {
        why(rep, "reward command exited with status %d%s", WEXITSTATUS(status),
            WEXITSTATUS(status) == 127 ? " (command not found?)" : "");
        return 1;
    }
    return 0;
nopipe:
    kiln_fail(ctx, KILN_ERR_IO, "kiln_reward_opts.cmd: cannot start '%s': pipe: %s", r->cmd,
              strerror(errno));
    return -1;
}

/* The command's scores into out (n); failures by the rule of kiln.h. */
static kiln_status score_cmd(kiln_ctx *ctx, const kiln_reward *r, int n,
                             const char *const *prompts, const char *const *completions,
                             const char *const *answers, float *out, kiln_reward_report *rep)
{
    for (int i = 0; i < n; i++) out[i] = 0;
    sbuf in = {0}, res = {0};
    kiln_status s = KILN_OK;
    for (int i = 0; i < n && !s; i++) {
        json_t *j = json_pack("{s:s?,s:s,s:s?}", "prompt", prompts ? prompts[i] : NULL,
                              "completion", completions[i], "answer", answers ? answers[i] : NULL);
        char *line = j ? json_dumps(j, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
        if (!line || !sb_add(&in, line, strlen(line)) || !sb_add(&in, "\n", 1))
            s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory writing the reward command's input");
        free(line);
        json_decref(j);
    }
    int rc = s ? -1 : run_cmd(ctx, r, &in, &res, rep);
    if (rc < 0) s = s ? s : KILN_ERR_IO;
    if (rc == 0) {
        int lines = 0;
        const char *p = res.p ? res.p : "";
        /* count lines: a last line without '\n' counts */
        for (const char *q = p; *q; q++) lines += *q == '\n';
        if (res.n && res.p[res.n - 1] != '\n') lines++;
        if (lines != n) {
            why(rep, "reward command printed %d line%s for %d completions", lines,
                lines == 1 ? "" : "s", n);
            rc = 1;
        } else {
            for (int i = 0; i < n; i++) {
                const char *e = strchr(p, '\n');
                size_t len = e ? (size_t)(e - p) : strlen(p);
                char tmp[64];
                const char *t = p;
                size_t tl = len;
                trim(&t, &tl);
                char *end = NULL;
                double v = NAN;
                if (tl && tl < sizeof tmp) {
                    memcpy(tmp, t, tl);
                    tmp[tl] = 0;
                    v = strtod(tmp, &end);
                }
                if (!end || *end || !isfinite(v)) {
                    rep->cmd_bad_lines++;
                    why(rep, "reward command line %d is not a finite number: '%.*s'", i + 1,
                        (int)(len < 40 ? len : 40), p);
                    v = 0;
                }
                out[i] = (float)v;
                p = e ? e + 1 : p + len;
            }
        }
    }
    if (rc == 1) {
        rep->cmd_failures++;
        for (int i = 0; i < n; i++) out[i] = 0;
    }
    if (rc == 1 || rep->cmd_bad_lines)
        kiln_log(ctx, KILN_LOG_WARN, "%s; %s", rep->why,
                 rc == 1 ? "every completion of this call scores 0 for cmd"
                         : "those completions score 0 for cmd");
    free(in.p);
    free(res.p);
    return s;
}

kiln_status kiln_reward_score(kiln_ctx *ctx, kiln_reward *r, int n, const char *const *prompts,
                              const char *const *completions, const char *const *answers,
                              float *out, float *terms, kiln_reward_report *rep)
{
    kiln_reward_report local;
    if (!rep) rep = &local;
    memset(rep, 0, sizeof *rep);
    float *t = terms ? terms : kiln_calloc(ctx, (size_t)r->n * (size_t)(n > 0 ? n : 1), sizeof *t);
    if (!t) return KILN_ERR_NOMEM;
    kiln_status s = KILN_OK;
    for (int k = 0; k < r->n && !s; k++) {
        float *tk = t + (size_t)k * n;
        for (int i = 0; i < n && r->kind[k] != TERM_CMD; i++) {
            const char *a = answers ? answers[i] : NULL;
            tk[i] = r->kind[k] == TERM_EXACT     ? score_exact(completions[i], a)
                    : r->kind[k] == TERM_NUMERIC ? score_numeric(completions[i], a, r->o.tolerance)
                                                 : score_regex(r, completions[i]);
        }
        if (r->kind[k] == TERM_CMD) s = score_cmd(ctx, r, n, prompts, completions, answers, tk, rep);
    }
    for (int i = 0; i < n && !s; i++) {
        double v = 0;
        for (int k = 0; k < r->n; k++) v += r->weight[k] * t[(size_t)k * n + i];
        out[i] = (float)v;
    }
    if (!terms) free(t);
    return s;
}
