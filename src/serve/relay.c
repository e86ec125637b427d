/*
 * relay.c — chunked request bodies for kiln serve. libmicrohttpd answers
 * bad chunk framing with an HTML page of its own and has no hook to change
 * that, so a chunked request never reaches it over the client's socket:
 * the gate hands libmicrohttpd one end of a socketpair instead, and a relay
 * thread (one per chunked request) sits between the two. It copies the
 * request head, decodes the client's chunked body as it arrives (RFC 9112
 * 7.1: hex size, optional extension, CRLF, data, CRLF, ..., a zero size,
 * trailer lines, an empty line; bare LF is taken for CRLF, as
 * libmicrohttpd does) and passes it on framed canonically, so
 * libmicrohttpd never sees bad framing; then it copies the response back.
 *
 * Bad framing at any offset, a body cut short (the client closed its side
 * before the last chunk) or a body that stalls for the gate's head deadline
 * is answered here with an OpenAI error (400, 400, 408) while
 * libmicrohttpd has not begun a response; libmicrohttpd's side is closed
 * first, which aborts the request there. A client that goes away closes
 * libmicrohttpd's side too (http.c's client_gone sees it and cancels the
 * generation); a half-close after the body is passed on as one.
 */
#include <microhttpd.h> /* before serve.h: declares gate_notify */

#include "serve/serve.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* bytes buffered each way before the relay stops reading that side */
#define RELAY_BUF (64 * 1024)

enum { CH_SIZE, CH_SIZE_WS, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_END, CH_DATA_LF,
       CH_TRAILER, CH_DONE };

struct chunk_dec {
    int state;
    int hex;             /* size digits read */
    uint64_t size;       /* of the chunk being read; its data bytes left in CH_DATA */
    size_t line;         /* trailer line: bytes so far (a CR before LF not counted) */
    bool colon, cr;      /* trailer line: has ':', last byte was CR */
};

void chunk_dec_init(chunk_dec *d)
{
    memset(d, 0, sizeof *d);
}

bool chunk_dec_done(const chunk_dec *d)
{
    return d->state == CH_DONE;
}

static int bad(char *msg, size_t cap, const char *what, int c)
{
    if (c >= 0)
        snprintf(msg, cap, "malformed chunked body: %s '%s%c'", what, c < 32 || c > 126 ? "\\x" : "",
                 c < 32 || c > 126 ? '?' : c);
    else
        snprintf(msg, cap, "malformed chunked body: %s", what);
    return -1;
}

int chunk_dec_feed(chunk_dec *d, const char *in, size_t n, char *out, size_t *out_n, char *msg,
                   size_t cap)
{
    size_t o = 0;
    for (size_t k = 0; k < n && d->state != CH_DONE; k++) {
        int c = (unsigned char)in[k];
        switch (d->state) {
        case CH_SIZE:
            if (isxdigit(c)) {
                if (d->hex == 15)
                    return bad(msg, cap, "a chunk size of more than 15 hex digits", -1);
                d->size = d->size * 16 + (uint64_t)(c <= '9' ? c - '0' : (c | 32) - 'a' + 10);
                d->hex++;
                break;
            }
            if (!d->hex)
                return bad(msg, cap, "a chunk starts where its size in hex is due with", c);
            d->state = CH_SIZE_WS;
            /* fall through */
        case CH_SIZE_WS:
            if (c == ' ' || c == '\t') break;
            if (c == ';') d->state = CH_EXT;
            else if (c == '\r') d->state = CH_SIZE_LF;
            else if (c == '\n') goto size_line_end;
            else return bad(msg, cap, "the chunk size line has, after the size,", c);
            break;
        case CH_EXT:
            if (c == '\r') d->state = CH_SIZE_LF;
            else if (c == '\n') goto size_line_end;
            break;
        case CH_SIZE_LF:
            if (c != '\n') return bad(msg, cap, "a CR in the chunk size line is followed by", c);
        size_line_end:
            d->hex = 0;
            if (d->size == 0) {
                d->state = CH_TRAILER;
                d->line = 0;
                d->colon = d->cr = false;
            } else {
                d->state = CH_DATA;
            }
            break;
        case CH_DATA: {
            size_t take = (size_t)KILN_MIN((uint64_t)(n - k), d->size);
            memcpy(out + o, in + k, take);
            o += take;
            k += take - 1;
            d->size -= take;
            if (d->size == 0) d->state = CH_DATA_END;
            break;
        }
        case CH_DATA_END:
            if (c == '\r') d->state = CH_DATA_LF;
            else if (c == '\n') d->state = CH_SIZE;
            else return bad(msg, cap, "a chunk's data is longer than its size", -1);
            break;
        case CH_DATA_LF:
            if (c != '\n') return bad(msg, cap, "a chunk's data is longer than its size", -1);
            d->state = CH_SIZE;
            break;
        case CH_TRAILER:
            if (c == '\n') {
                size_t l = d->line - (d->cr ? 1 : 0);
                if (l == 0) {
                    d->state = CH_DONE;
                    break;
                }
                if (!d->colon)
                    return bad(msg, cap, "a trailer line after the last chunk is not 'Name: value'", -1);
                d->line = 0;
                d->colon = d->cr = false;
                break;
            }
            d->line++;
            d->cr = c == '\r';
            if (c == ':') d->colon = true;
            break;
        }
    }
    *out_n = o;
    return d->state == CH_DONE ? 1 : 0;
}

/* ---- the relay thread ------------------------------------------------ */

typedef struct relay {
    relay_pool *pool;
    int cfd, pfd;        /* the client; our end of libmicrohttpd's socketpair */
    struct sockaddr_storage sa;
    double t0;
    chunk_dec dec;
    char *to_mhd, *to_cli; /* (RELAY_BUF + framing) each way */
    size_t mhd_len, cli_len;
    uint64_t from_mhd;   /* response bytes libmicrohttpd wrote */
    char first[13];      /* its first bytes: an interim "HTTP/1.1 100" is no response yet */
    bool mhd_eof, cli_eof, body_done, cli_shut;
    char *in;            /* (RELAY_BUF) client bytes read */
    char *dec_out;       /* (RELAY_BUF) decoded */
} relay;

/* Whether libmicrohttpd began a final response (not just 100 Continue). */
static bool responded(const relay *r)
{
    if (r->from_mhd == 0) return false;
    if (r->from_mhd < 12) return strncmp(r->first, "HTTP/1.1 100", (size_t)r->from_mhd) != 0;
    return strncmp(r->first, "HTTP/1.1 100", 12) != 0 || r->from_mhd > 25;
}

/* Appends data to b (len *l) as one canonical chunk "SIZE\r\nDATA\r\n". */
static void put_chunk(char *b, size_t *l, const char *data, size_t n)
{
    *l += (size_t)sprintf(b + *l, "%zx\r\n", n);
    memcpy(b + *l, data, n);
    *l += n;
    b[(*l)++] = '\r';
    b[(*l)++] = '\n';
}

/* Discards the client's input until EOF or 2 s (so closing does not reset
 * an answer away), then closes it. */
static void linger_close(int fd)
{
    shutdown(fd, SHUT_WR);
    double end = kiln_time_now() + 2;
    char b[4096];
    for (;;) {
        int ms = (int)((end - kiln_time_now()) * 1000);
        if (ms <= 0) break;
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, ms) <= 0) break;
        ssize_t n = recv(fd, b, sizeof b, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) break;
    }
    close(fd);
}

/* Ends the request with an OpenAI error of our own when libmicrohttpd has
 * not begun a response (else just closes): libmicrohttpd's side first. */
static void relay_fail(relay *r, int status, const char *code, const char *msg)
{
    close(r->pfd);
    r->pfd = -1;
    if (responded(r)) {
        close(r->cfd);
        return;
    }
    size_t n = gate_answer(r->cfd, status, "invalid_request_error", code, msg);
    relay_pool *p = r->pool;
    if (p->log) p->log(p->log_ud, (const struct sockaddr *)&r->sa, status, n, kiln_time_now() - r->t0);
    linger_close(r->cfd);
}

static void relay_run(relay *r)
{
    relay_pool *pool = r->pool;
    char msg[200];
    double idle_end = kiln_time_now() + pool->idle_secs;
    double flush_end = 0; /* libmicrohttpd is done: the client has 30 s to read the rest */
    for (;;) {
        struct pollfd f[3];
        f[0] = (struct pollfd){r->cfd, 0, 0};
        if (!r->body_done && !r->cli_eof && r->mhd_len < RELAY_BUF && !r->mhd_eof) f[0].events |= POLLIN;
        if (r->cli_len) f[0].events |= POLLOUT;
        if (!r->cli_shut) f[0].events |= POLLRDHUP;
        f[1] = (struct pollfd){r->pfd, 0, 0};
        if (r->cli_len < RELAY_BUF && !r->mhd_eof) f[1].events |= POLLIN;
        if (r->mhd_len) f[1].events |= POLLOUT;
        f[2] = (struct pollfd){pool->wake, POLLIN, 0};
        if (r->mhd_eof && !flush_end) flush_end = kiln_time_now() + 30;
        double until = !r->body_done ? idle_end : flush_end ? flush_end : 0;
        int ms = -1;
        if (until) {
            ms = (int)((until - kiln_time_now()) * 1000) + 1;
            if (ms < 1) ms = 1;
        }
        int pr = poll(f, 3, ms);
        if (pr < 0 && errno != EINTR) break;
        if (f[2].revents) break; /* the server stops */
        /* the body's deadline counts time spent waiting for the client,
         * not for libmicrohttpd to take what was read */
        if (r->mhd_len >= RELAY_BUF) idle_end = kiln_time_now() + pool->idle_secs;
        if (!r->body_done && kiln_time_now() >= idle_end) {
            snprintf(msg, sizeof msg, "the chunked request body stalled: no bytes of it for %g s",
                     pool->idle_secs);
            relay_fail(r, 408, "request_timeout", msg);
            return;
        }
        if (flush_end && kiln_time_now() >= flush_end) break; /* a client that does not read */
        if (pr <= 0) continue;
        /* libmicrohttpd -> client */
        if (f[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = recv(r->pfd, r->to_cli + r->cli_len, RELAY_BUF - r->cli_len, MSG_DONTWAIT);
            if (n > 0) {
                for (ssize_t i = 0; i < n && r->from_mhd + (uint64_t)i < 12; i++)
                    r->first[r->from_mhd + (uint64_t)i] = r->to_cli[r->cli_len + (size_t)i];
                r->cli_len += (size_t)n;
                r->from_mhd += (uint64_t)n;
            } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                r->mhd_eof = true;
            }
        }
        if (r->cli_len && (f[0].revents & POLLOUT)) {
            ssize_t n = send(r->cfd, r->to_cli, r->cli_len, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                memmove(r->to_cli, r->to_cli + n, r->cli_len - (size_t)n);
                r->cli_len -= (size_t)n;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                break; /* the client is gone */
            }
        }
        if (r->mhd_eof && !r->cli_len) {
            /* the response is out: libmicrohttpd is done with the request */
            close(r->pfd);
            r->pfd = -1;
            if (!r->from_mhd && !r->body_done) {
                close(r->cfd); /* it dropped the request unanswered, as it would have */
                return;
            }
            linger_close(r->cfd);
            return;
        }
        /* client -> libmicrohttpd */
        if (!r->body_done && !r->cli_eof && (f[0].revents & (POLLIN | POLLHUP | POLLERR | POLLRDHUP)) &&
            r->mhd_len < RELAY_BUF) {
            ssize_t n = recv(r->cfd, r->in, RELAY_BUF - r->mhd_len > 16384 ? 16384 : RELAY_BUF - r->mhd_len,
                             MSG_DONTWAIT);
            if (n > 0) {
                idle_end = kiln_time_now() + pool->idle_secs;
                size_t dn = 0;
                int st = chunk_dec_feed(&r->dec, r->in, (size_t)n, r->dec_out, &dn, msg, sizeof msg);
                if (st < 0) {
                    relay_fail(r, 400, "malformed_chunked_body", msg);
                    return;
                }
                if (dn) put_chunk(r->to_mhd, &r->mhd_len, r->dec_out, dn);
                if (st == 1) {
                    memcpy(r->to_mhd + r->mhd_len, "0\r\n\r\n", 5);
                    r->mhd_len += 5;
                    r->body_done = true;
                }
            } else if (n == 0) {
                r->cli_eof = true;
                relay_fail(r, 400, "malformed_chunked_body",
                           "the chunked body ended (the client closed its side) before its last, "
                           "zero-size chunk");
                return;
            } else if (errno != EAGAIN && errno != EINTR) {
                break;
            }
        } else if (r->body_done && (f[0].revents & (POLLHUP | POLLERR))) {
            break; /* the client is gone: so is libmicrohttpd's side */
        } else if (r->body_done && !r->cli_shut && (f[0].revents & POLLRDHUP)) {
            /* the client closed its side after the body: pass that on */
            r->cli_shut = true;
            if (!r->mhd_len) shutdown(r->pfd, SHUT_WR);
        }
        if (r->mhd_len && (f[1].revents & POLLOUT)) {
            ssize_t n = send(r->pfd, r->to_mhd, r->mhd_len, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                memmove(r->to_mhd, r->to_mhd + n, r->mhd_len - (size_t)n);
                r->mhd_len -= (size_t)n;
                if (!r->mhd_len && r->cli_shut) shutdown(r->pfd, SHUT_WR);
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                r->mhd_len = 0; /* libmicrohttpd closed: its answer (if any) follows */
                r->body_done = true;
            }
        }
    }
    if (r->pfd >= 0) close(r->pfd);
    close(r->cfd);
}

static void *relay_main(void *arg)
{
    relay *r = arg;
    relay_run(r);
    relay_pool *p = r->pool;
    free(r->to_mhd);
    free(r->to_cli);
    free(r->in);
    free(r->dec_out);
    free(r);
    pthread_mutex_lock(&p->mu);
    if (--p->live == 0) pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

void relay_pool_init(relay_pool *p, int wake, double idle_secs)
{
    memset(p, 0, sizeof *p);
    p->wake = wake;
    p->idle_secs = idle_secs;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
}

void relay_pool_wait(relay_pool *p)
{
    pthread_mutex_lock(&p->mu);
    while (p->live > 0) pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

void relay_pool_destroy(relay_pool *p)
{
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
}

int relay_start(relay_pool *p, int cfd, size_t head_len, const struct sockaddr_storage *sa)
{
    int sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sp)) return -1;
    relay *r = calloc(1, sizeof *r);
    /* framing grows a buffer's worth of data by a few bytes per chunk */
    char *tm = malloc(RELAY_BUF + 16384 + 64), *tc = malloc(RELAY_BUF), *in = malloc(16384),
         *dout = malloc(16384);
    if (!r || !tm || !tc || !in || !dout || head_len > RELAY_BUF) goto fail;
    *r = (relay){.pool = p, .cfd = cfd, .pfd = sp[0], .sa = *sa, .t0 = kiln_time_now(),
                 .to_mhd = tm, .to_cli = tc, .in = in, .dec_out = dout};
    chunk_dec_init(&r->dec);
    /* the head: peeked by the gate, all there; passed on as it is */
    ssize_t n = recv(cfd, tm, head_len, MSG_DONTWAIT);
    if (n != (ssize_t)head_len) goto fail;
    r->mhd_len = head_len;
    pthread_mutex_lock(&p->mu);
    p->live++;
    pthread_mutex_unlock(&p->mu);
    pthread_t th;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    int e = pthread_create(&th, &at, relay_main, r);
    pthread_attr_destroy(&at);
    if (e) {
        pthread_mutex_lock(&p->mu);
        p->live--;
        pthread_mutex_unlock(&p->mu);
        goto fail;
    }
    return sp[1];
fail:
    free(r);
    free(tm);
    free(tc);
    free(in);
    free(dout);
    close(sp[0]);
    close(sp[1]);
    return -1;
}
