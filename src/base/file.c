/*
 * file.c — files as the rest of kiln needs them: read-only mmap of large
 * inputs, whole-file reads of small ones, and atomic writes (temp file,
 * fsync, rename, fsync of the directory) so that a crash at any instant
 * leaves either the old file or the new one, never a torn one. Also
 * CRC-32C for checksums.
 */
#include "base.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

kiln_status file_map_open(kiln_ctx *ctx, const char *path, file_map *m)
{
    m->data = NULL;
    m->size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kiln_fail(ctx, KILN_ERR_IO, "cannot open '%s': %s", path,
                         strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return kiln_fail(ctx, KILN_ERR_IO, "cannot stat '%s': %s", path,
                         strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return kiln_fail(ctx, KILN_ERR_IO, "'%s' is not a regular file",
                         path);
    }
    if (st.st_size == 0) {
        close(fd);
        return KILN_OK;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED)
        return kiln_fail(ctx, KILN_ERR_IO, "cannot mmap '%s': %s", path,
                         strerror(e));
    m->data = p;
    m->size = (size_t)st.st_size;
    return KILN_OK;
}

void file_map_close(file_map *m)
{
    if (m->data) munmap((void *)m->data, m->size);
    m->data = NULL;
    m->size = 0;
}

kiln_status file_read_all(kiln_ctx *ctx, const char *path, char **out,
                          size_t *len)
{
    *out = NULL;
    if (len) *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return kiln_fail(ctx, KILN_ERR_IO, "cannot open '%s': %s", path,
                         strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory reading '%s'",
                         path);
    }
    for (;;) {
        if (n + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                fclose(f);
                return kiln_fail(ctx, KILN_ERR_NOMEM,
                                 "out of memory reading '%s'", path);
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return kiln_fail(ctx, KILN_ERR_IO, "error reading '%s'", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return KILN_OK;
}

char *file_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t k = a;
    if (a > 0 && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

bool file_is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

kiln_status file_mkdirs(kiln_ctx *ctx, const char *path)
{
    char *p = strdup(path);
    if (!p) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    size_t n = strlen(p);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] == '/' || p[i] == 0) {
            char c = p[i];
            p[i] = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                kiln_status s = kiln_fail(ctx, KILN_ERR_IO,
                                          "cannot create directory '%s': %s",
                                          p, strerror(errno));
                free(p);
                return s;
            }
            p[i] = c;
        }
    }
    free(p);
    if (!file_is_dir(path))
        return kiln_fail(ctx, KILN_ERR_IO, "'%s' exists and is not a directory",
                         path);
    return KILN_OK;
}

static bool looks_binary(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    unsigned char buf[4096];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    return memchr(buf, 0, n) != NULL;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static kiln_status walk(kiln_ctx *ctx, const char *path, const char *what,
                        bool top, file_visit_fn visit, void *ud)
{
    struct stat st;
    if ((top ? stat(path, &st) : lstat(path, &st)) != 0)
        return kiln_fail(ctx, KILN_ERR_IO, "%s '%s': %s", what, path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d)
            return kiln_fail(ctx, KILN_ERR_IO, "cannot read directory '%s': %s", path,
                             strerror(errno));
        char **names = NULL;
        size_t n = 0, cap = 0;
        struct dirent *e;
        kiln_status s = KILN_OK;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            if (n == cap) {
                cap = cap ? 2 * cap : 64;
                char **nn = realloc(names, cap * sizeof *nn);
                if (!nn) {
                    s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
                    break;
                }
                names = nn;
            }
            names[n] = file_join(path, e->d_name);
            if (!names[n]) {
                s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
                break;
            }
            n++;
        }
        closedir(d);
        if (names) qsort(names, n, sizeof *names, cmp_str);
        for (size_t i = 0; i < n && !s; i++) s = walk(ctx, names[i], what, false, visit, ud);
        for (size_t i = 0; i < n; i++) free(names[i]);
        free(names);
        return s;
    }
    if (!S_ISREG(st.st_mode)) {
        if (top)
            return kiln_fail(ctx, KILN_ERR_IO,
                             "%s '%s' is not a regular file or directory", what, path);
        return KILN_OK;
    }
    if (!top && looks_binary(path)) {
        kiln_log(ctx, KILN_LOG_DEBUG, "skipping binary file %s", path);
        return KILN_OK;
    }
    return visit(ctx, ud, path, (int64_t)st.st_size);
}

kiln_status file_walk(kiln_ctx *ctx, const char *path, const char *what,
                      file_visit_fn visit, void *ud)
{
    return walk(ctx, path, what, true, visit, ud);
}

kiln_status file_fsync_dir(kiln_ctx *ctx, const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return kiln_fail(ctx, KILN_ERR_IO, "cannot open directory '%s': %s",
                         dir, strerror(errno));
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    /* Some filesystems refuse fsync on directories; that is not an error
     * worth failing a save for. */
    if (rc != 0 && e != EINVAL && e != EBADF)
        return kiln_fail(ctx, KILN_ERR_IO, "cannot fsync directory '%s': %s",
                         dir, strerror(e));
    return KILN_OK;
}

kiln_status file_writer_open(kiln_ctx *ctx, file_writer *w, const char *path)
{
    memset(w, 0, sizeof *w);
    size_t n = strlen(path) + 32;
    w->tmp_path = malloc(n);
    w->final_path = strdup(path);
    if (!w->tmp_path || !w->final_path) {
        free(w->tmp_path);
        free(w->final_path);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    snprintf(w->tmp_path, n, "%s.tmp.%ld", path, (long)getpid());
    w->f = fopen(w->tmp_path, "wb");
    if (!w->f) {
        kiln_status s = kiln_fail(ctx, KILN_ERR_IO, "cannot create '%s': %s",
                                  w->tmp_path, strerror(errno));
        free(w->tmp_path);
        free(w->final_path);
        w->tmp_path = w->final_path = NULL;
        return s;
    }
    return KILN_OK;
}

void file_writer_write(file_writer *w, const void *data, size_t len)
{
    if (w->failed || len == 0) return;
    if (fwrite(data, 1, len, w->f) != len) w->failed = true;
    w->crc = crc32c(w->crc, data, len);
}

void file_writer_abort(file_writer *w)
{
    if (w->f) fclose(w->f);
    if (w->tmp_path) unlink(w->tmp_path);
    free(w->tmp_path);
    free(w->final_path);
    memset(w, 0, sizeof *w);
}

kiln_status file_writer_commit(kiln_ctx *ctx, file_writer *w)
{
    kiln_status s = KILN_OK;
    if (fflush(w->f) != 0) w->failed = true;
    if (!w->failed && fsync(fileno(w->f)) != 0) w->failed = true;
    if (w->failed) {
        s = kiln_fail(ctx, KILN_ERR_IO, "error writing '%s': %s (disk full?)",
                      w->tmp_path, strerror(errno));
        file_writer_abort(w);
        return s;
    }
    fclose(w->f);
    w->f = NULL;
    if (rename(w->tmp_path, w->final_path) != 0) {
        s = kiln_fail(ctx, KILN_ERR_IO, "cannot rename '%s' to '%s': %s",
                      w->tmp_path, w->final_path, strerror(errno));
        file_writer_abort(w);
        return s;
    }
    char *d = strdup(w->final_path);
    if (d) {
        s = file_fsync_dir(ctx, dirname(d));
        free(d);
    }
    free(w->tmp_path);
    free(w->final_path);
    memset(w, 0, sizeof *w);
    return s;
}

kiln_status file_write_atomic(kiln_ctx *ctx, const char *path,
                              const void *data, size_t len)
{
    file_writer w;
    kiln_status s = file_writer_open(ctx, &w, path);
    if (s) return s;
    file_writer_write(&w, data, len);
    return file_writer_commit(ctx, &w);
}

/* CRC-32C, reflected polynomial 0x82F63B78, slicing-by-1 table built on
 * first use (the table is constant, so racing initialisers agree). */
static uint32_t crc_table[256];
static int crc_ready;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
    __atomic_store_n(&crc_ready, 1, __ATOMIC_RELEASE);
}

uint32_t crc32c(uint32_t crc, const void *data, size_t len)
{
    if (!__atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE)) crc_init();
    const unsigned char *p = data;
    crc = ~crc;
#if defined(__SSE4_2__)
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = (uint32_t)__builtin_ia32_crc32di(crc, v);
        p += 8;
        len -= 8;
    }
#endif
    while (len--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}
