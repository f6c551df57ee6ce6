/*
 * LD_PRELOAD library for tritonserver: completes the restricted-API options from a key FILE, so that the key is
 * never part of the process's command line (/proc/<pid>/cmdline, ps) nor of its environment.
 *
 * Why: tritonserver reads --http-restricted-api / --grpc-restricted-protocol only from argv (getopt_long in
 * src/command_line_parser.cc, TritonParser::Parse; no environment variable, no config file; the in-process Python
 * frontend has no restricted-protocol support yet: src/python/tritonfrontend/_api/_kservehttp.py, DLIS-7215).
 *
 * How: glibc runs a preloaded library's constructors with (argc, argv, envp) before main, and main later receives
 * the same argv array. For each argument "--http-restricted-api=<apis>:<key>" or
 * "--grpc-restricted-protocol=<apis>:<key>" that has no "=<value>" after the key, this replaces the array entry by
 * a heap copy with "=<content of $EOML_RESTRICTED_API_KEY_FILE>" appended. The kernel's view of the command line
 * is the original argument area, which is left as it was: it never holds the key.
 *
 * Fails closed: a restricted option without a value and no readable, non-empty key file ends the process (exit 2)
 * before tritonserver starts, with a message that names the file, never its content.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KEY_FILE_VARIABLE "EOML_RESTRICTED_API_KEY_FILE"
#define MAX_KEY_BYTES 4096

static const char *const RESTRICTED_OPTIONS[] = {"--http-restricted-api=", "--grpc-restricted-protocol="};

/* The option's value lacks "=<value>" after "<apis>:<key>". */
static int needs_key(const char *argument)
{
    for (size_t i = 0; i < sizeof(RESTRICTED_OPTIONS) / sizeof(RESTRICTED_OPTIONS[0]); ++i) {
        size_t prefix = strlen(RESTRICTED_OPTIONS[i]);
        if (strncmp(argument, RESTRICTED_OPTIONS[i], prefix) == 0) {
            const char *colon = strchr(argument + prefix, ':');
            return colon != NULL && strchr(colon, '=') == NULL;
        }
    }
    return 0;
}

static void refuse(const char *why, const char *path)
{
    fprintf(stderr, "restricted-key preload: %s (%s=%s)\n", why, KEY_FILE_VARIABLE, path ? path : "<unset>");
    _exit(2);
}

/* The key file's content without trailing newlines; exits when it cannot be used. */
static char *read_key(void)
{
    const char *path = getenv(KEY_FILE_VARIABLE);
    if (path == NULL || *path == '\0')
        refuse("a restricted-API option has no value and no key file is set", path);
    FILE *file = fopen(path, "re");
    if (file == NULL)
        refuse(strerror(errno), path);
    char *key = calloc(MAX_KEY_BYTES + 1, 1);
    size_t length = key ? fread(key, 1, MAX_KEY_BYTES + 1, file) : 0;
    fclose(file);
    if (key == NULL || length > MAX_KEY_BYTES)
        refuse("the key file is larger than 4096 bytes", path);
    while (length > 0 && (key[length - 1] == '\n' || key[length - 1] == '\r'))
        key[--length] = '\0';
    if (length == 0 || memchr(key, '\0', length) != NULL)
        refuse("the key file is empty or holds a NUL byte", path);
    return key;
}

__attribute__((constructor)) static void complete_restricted_options(int argc, char **argv, char **envp)
{
    (void)envp;
    char *key = NULL;
    for (int i = 1; i < argc; ++i) {
        if (argv[i] == NULL || !needs_key(argv[i]))
            continue;
        if (key == NULL)
            key = read_key();
        size_t size = strlen(argv[i]) + 1 + strlen(key) + 1;
        char *completed = malloc(size);
        if (completed == NULL)
            refuse("out of memory", getenv(KEY_FILE_VARIABLE));
        snprintf(completed, size, "%s=%s", argv[i], key);
        argv[i] = completed; /* the array main() receives; /proc/<pid>/cmdline keeps the original text */
    }
    /* The key stays in this process's heap, as it would with any way of passing it. */
}
