# kiln — GNU Makefile.
#
#   make            build build/libkiln.a and build/kiln
#   make test       install missing Debian packages, build, run every test
#   make asan       the same tests under AddressSanitizer + UBSan
#   make bench      build and run the benchmarks
#   make demo       the quick start: train a small model on a real corpus
#   make info       what optional dependencies were found
#   make fuzz       build the libFuzzer harnesses (clang) and run them briefly
#   make mutate     plant each bug of tests/mutations.txt in a copy; every one
#                   must be caught by the tests it names (tests/mutate.py)
#   make static     the edge build: build-static/kiln-run, one statically
#                   linked binary for inference (generate, chat, serve, eval,
#                   info) with no shared libraries at all (docs/quantize.md)
#
# Variables: WERROR=1 (warnings are errors; CI), BUILD=dir, SAN=1,
# ARCH=-march=native (set ARCH= for a portable build), NO_DNNL=1, NO_MPI=1,
# V=1 (print full compiler command lines).

BUILD   ?= build
CC      ?= gcc
ARCH    ?= -march=native
OPT     ?= -O2
WARN    := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes
CFLAGS_BASE := -std=c11 -D_GNU_SOURCE $(OPT) $(ARCH) -g -fopenmp -fno-math-errno $(WARN) \
               -Iinclude -MMD -MP
LDLIBS  := -fopenmp -lm -lpthread
DEFS    :=

ifeq ($(WERROR),1)
CFLAGS_BASE += -Werror
endif
ifeq ($(SAN),1)
CFLAGS_BASE += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDLIBS  += -fsanitize=address,undefined
DEFS    += -DKILN_SANITIZE=1
endif

# ---- required dependencies (Debian packages; scripts/deps.sh installs) --
LDLIBS  += -ljansson -lpcre2-8 -lmicrohttpd

# ---- optional dependencies, detected ---------------------------------
HAVE_DNNL := $(if $(NO_DNNL),,$(shell test -f /usr/include/dnnl.h -o -f /usr/include/oneapi/dnnl/dnnl.h && echo 1))
ifeq ($(HAVE_DNNL),1)
DEFS    += -DKILN_HAVE_DNNL=1
LDLIBS  += -ldnnl
endif
HAVE_ICU := $(if $(NO_ICU),,$(shell test -f /usr/include/unicode/unorm2.h && echo 1))
ifeq ($(HAVE_ICU),1)
DEFS    += -DKILN_HAVE_ICU=1
LDLIBS  += -licuuc
endif
HAVE_MPI := $(if $(NO_MPI),,$(shell command -v mpicc >/dev/null 2>&1 && echo 1))
ifeq ($(HAVE_MPI),1)
DEFS    += -DKILN_HAVE_MPI=1
CFLAGS_BASE += $(shell mpicc --showme:compile)
LDLIBS  += $(shell mpicc --showme:link)
endif

CFLAGS  := $(CFLAGS_BASE) $(DEFS) $(EXTRA_CFLAGS)

# The layers (docs/architecture.md): the library's objects see its private
# headers (-Isrc); tools/ and examples/ are built on include/kiln.h alone
# (tools/cli.h sits beside the tools), so an #include of anything under
# src/ there fails to compile. Tests and benchmarks may look inside.
LIB_INC   := -Isrc
TOOL_INC  :=

LIB_SRC   := $(sort $(wildcard src/*/*.c src/*/*/*.c))
TOOL_SRC  := $(sort $(wildcard tools/*.c))
TEST_SRC  := $(sort $(wildcard tests/test_*.c))
BENCH_SRC := $(sort $(wildcard bench/*.c))
EX_SRC    := $(sort $(wildcard examples/*.c))

LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
TOOL_OBJ  := $(TOOL_SRC:%.c=$(BUILD)/obj/%.o)
TEST_BIN  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
EX_BIN    := $(EX_SRC:examples/%.c=$(BUILD)/examples/%)
LIB       := $(BUILD)/libkiln.a

$(LIB_OBJ): LAYER_INC := $(LIB_INC)
$(TOOL_OBJ): LAYER_INC := $(TOOL_INC)

.PHONY: all info test asan bench demo deps fuzz mutate clean examples tests static
all: info-line $(LIB) $(BUILD)/kiln

info-line:
	@echo "kiln: oneDNN=$(if $(HAVE_DNNL),yes,no) MPI=$(if $(HAVE_MPI),yes,no) ICU=$(if $(HAVE_ICU),yes,no) CC=$(CC) BUILD=$(BUILD)"
.PHONY: info-line

info:
	@echo "kiln $(shell sed -n 's/^#define KILN_VERSION "\(.*\)"/\1/p' include/kiln.h)"
	@echo "  compiler : $(CC) ($(shell $(CC) -dumpversion))"
	@echo "  flags    : $(OPT) $(ARCH)"
	@echo "  oneDNN   : $(if $(HAVE_DNNL),yes (libdnnl: fast fp32/bf16 GEMM),no (portable kernels only; apt-get install libdnnl-dev))"
	@echo "  Open MPI : $(if $(HAVE_MPI),yes (distributed training),no (world size 1; apt-get install libopenmpi-dev openmpi-bin))"
	@echo "  ICU      : $(if $(HAVE_ICU),yes (NFC normalizer of Qwen2 tokenizers),no (tokenizers with an NFC normalizer refused; apt-get install libicu-dev))"

ifeq ($(V),1)
Q :=
else
Q := @
endif

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS) $(LAYER_INC) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	@rm -f $@
	@$(if $(Q),echo "  AR      $@")
	$(Q)ar rcs $@ $^

$(BUILD)/kiln: $(TOOL_OBJ) $(LIB)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(CFLAGS) -o $@ $(TOOL_OBJ) $(LIB) $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(LIB) tests/check.h tests/testdata.h
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(CFLAGS) -Isrc -Itests -o $@ $< $(LIB) $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(CFLAGS) -Isrc -o $@ $< $(LIB) $(LDLIBS)

$(BUILD)/examples/%: examples/%.c $(LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(CFLAGS) -o $@ $< $(LIB) $(LDLIBS)

# The edge build: the inference commands alone (the other cmd_* are weak
# symbols, so kiln.c lists only what is linked), linked with -static against
# the static archives of glibc, libgomp, jansson, pcre2 and libmicrohttpd,
# without oneDNN (Debian ships no static libdnnl; the fp32 products take the
# blocked OpenMP GEMM, the quantized ones the same kernels as ever) and
# without MPI, and without ICU (its static archives need libstdc++ and a
# 30 MB data library: a tokenizer with an NFC normalizer, Qwen2's, is
# refused there, saying so). tools/static/notls.c stands in for the GnuTLS
# that Debian's libmicrohttpd.a refers to (kiln serve never uses TLS).
# Stripped (-s).
STATIC_BUILD := build-static
KILN_RUN_OBJ := $(addprefix $(BUILD)/obj/tools/,kiln.o cli.o cmd_generate.o cmd_chat.o \
                  cmd_serve.o cmd_eval.o cmd_init.o static/notls.o)

static:
	@$(MAKE) --no-print-directory BUILD=$(STATIC_BUILD) NO_DNNL=1 NO_MPI=1 NO_ICU=1 $(STATIC_BUILD)/kiln-run

$(BUILD)/kiln-run: $(KILN_RUN_OBJ) $(LIB)
	@$(if $(Q),echo "  LINK    $@ (static)")
	$(Q)$(CC) $(CFLAGS) -static -s -o $@ $(KILN_RUN_OBJ) $(LIB) $(LDLIBS) 2>$@.log || { cat $@.log; exit 1; }
	$(Q)grep -v -e "Using 'dlopen' in statically linked" -e "in function .gomp_target_init" $@.log >&2 || true

tests: all $(TEST_BIN) $(EX_BIN)
examples: $(EX_BIN)

deps:
	@bash scripts/deps.sh

test: deps
	@$(MAKE) --no-print-directory tests
	@bash tests/run.sh $(BUILD)

asan: deps
	@$(MAKE) --no-print-directory BUILD=build-asan SAN=1 OPT=-O1 tests
	@KILN_SANITIZE=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 bash tests/run.sh build-asan

bench: deps all $(BENCH_BIN)
	@bash bench/run.sh $(BUILD)

demo: deps
	@$(MAKE) --no-print-directory all
	@bash scripts/demo.sh $(BUILD)

fuzz: deps
	@bash fuzz/run.sh

mutate: deps
	@python3 tests/mutate.py --workers 2 $(MUTATE_ARGS)

clean:
	rm -rf build build-asan build-fuzz build-clang-portable build-static

-include $(LIB_OBJ:.o=.d) $(TOOL_OBJ:.o=.d) $(TEST_BIN:=.d) $(BUILD)/obj/tools/static/notls.d
