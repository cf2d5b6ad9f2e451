// SPDX-License-Identifier: MIT
/* Tests of the error model and logging: kv_strerror names, the
 * thread-local detail string, the log callback and KV_LOG levels. */
#include <pthread.h>

#include "kvtest.h"

static void test_version(void **state)
{
	(void)state;
	assert_string_equal(kv_version(), KV_VERSION_STRING);
	assert_int_equal(kv_version_number(), KV_VERSION_NUMBER);
	assert_int_equal(KV_VERSION_NUMBER >> 16, KV_VERSION_MAJOR);
}

static void test_strerror(void **state)
{
	(void)state;
	assert_string_equal(kv_strerror(0), "success");
	assert_non_null(strstr(kv_strerror(-ENOMEM), "ENOMEM"));
	assert_string_equal(kv_strerror(ENOMEM), kv_strerror(-ENOMEM));
	assert_non_null(strstr(kv_strerror(-EBADMSG), "corrupt"));
	assert_non_null(strstr(kv_strerror(-ENOTSUP), "ENOTSUP"));
	assert_non_null(kv_strerror(-99999));
}

static void *fail_in_thread(void *arg)
{
	enum kv_tier t;

	(void)arg;
	kv_clear_error();
	if (kv_tier_parse("other-thread", &t) != -EINVAL)
		return (void *)1;
	return strstr(kv_last_error(), "other-thread") ? NULL : (void *)2;
}

static void test_detail_is_thread_local(void **state)
{
	enum kv_tier t;
	pthread_t th;
	void *ret;

	(void)state;
	kv_clear_error();
	assert_string_equal(kv_last_error(), "");
	kv_assert_rc(kv_tier_parse("mine", &t), -EINVAL);
	assert_int_equal(pthread_create(&th, NULL, fail_in_thread, NULL), 0);
	assert_int_equal(pthread_join(th, &ret), 0);
	assert_null(ret);
	assert_non_null(strstr(kv_last_error(), "mine"));
	assert_null(strstr(kv_last_error(), "other-thread"));
	/* A success leaves the detail alone, like errno. */
	kv_assert_ok(kv_tier_parse("dram", &t));
	assert_non_null(strstr(kv_last_error(), "mine"));
	kv_clear_error();
	assert_string_equal(kv_last_error(), "");
}

struct captured {
	int calls;
	enum kv_log_level last_level;
	char last[512];
};

static void capture(enum kv_log_level level, const char *msg, void *ctx)
{
	struct captured *c = ctx;

	c->calls++;
	c->last_level = level;
	snprintf(c->last, sizeof(c->last), "%s", msg);
}

static void test_log_callback_levels(void **state)
{
	struct captured c = { 0 };
	enum kv_tier t;

	(void)state;
	/* Failures log their detail at debug level. */
	kv_set_log(capture, KV_LOG_DEBUG, &c);
	kv_assert_rc(kv_tier_parse("loggedtier", &t), -EINVAL);
	assert_int_equal(c.calls, 1);
	assert_int_equal(c.last_level, KV_LOG_DEBUG);
	assert_non_null(strstr(c.last, "loggedtier"));
	assert_null(strchr(c.last, '\n'));

	kv_set_log(capture, KV_LOG_WARN, &c);
	kv_assert_rc(kv_tier_parse("quiet", &t), -EINVAL);
	assert_int_equal(c.calls, 1);

	/* A leak warning reaches a warn-level sink. */
	struct kv_registry *reg;
	kv_handle h;
	kv_assert_ok(kv_registry_create(NULL, &reg));
	kv_assert_ok(kv_registry_record(reg, 4096, KV_TIER_DRAM, 0, KV_KIND_KV, 0, "leaky", &h));
	kv_assert_rc(kv_registry_destroy(reg, 0), -EBUSY);
	assert_true(c.calls >= 2);
	assert_int_equal(c.last_level, KV_LOG_WARN);
	assert_non_null(strstr(c.last, "leaky"));
	kv_assert_ok(kv_registry_forget(reg, h));
	kv_assert_ok(kv_registry_destroy(reg, 0));

	kv_set_log(NULL, KV_LOG_ERROR, NULL);
	assert_string_equal(kv_log_level_name(KV_LOG_WARN), "warn");
	assert_null(kv_log_level_name((enum kv_log_level)9));
}

/* KV_LOG=debug with no callback writes to stderr: checked in a child whose
 * stderr is a pipe, since this process's stderr belongs to the runner. */
static void test_env_log_to_stderr(void **state)
{
	char cmd[4096], line[1024];
	const char *self = getenv("KV_TEST_SELF");
	FILE *p;
	int found = 0;

	(void)state;
	if (!self) {
		skip();
		return;
	}
	snprintf(cmd, sizeof(cmd), "KV_LOG=debug KV_TEST_CHILD=1 '%s' 2>&1 >/dev/null", self);
	p = popen(cmd, "r");
	assert_non_null(p);
	while (fgets(line, sizeof(line), p))
		if (strstr(line, "libkv debug:") && strstr(line, "childtier"))
			found = 1;
	assert_int_equal(pclose(p), 0);
	assert_true(found);

	snprintf(cmd, sizeof(cmd), "KV_LOG=error KV_TEST_CHILD=1 '%s' 2>&1 >/dev/null", self);
	p = popen(cmd, "r");
	assert_non_null(p);
	found = 0;
	while (fgets(line, sizeof(line), p))
		found = 1;
	assert_int_equal(pclose(p), 0);
	assert_false(found);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_version),
		cmocka_unit_test(test_strerror),
		cmocka_unit_test(test_detail_is_thread_local),
		cmocka_unit_test(test_log_callback_levels),
		cmocka_unit_test(test_env_log_to_stderr),
	};

	if (getenv("KV_TEST_CHILD")) {
		enum kv_tier t;
		return kv_tier_parse("childtier", &t) == -EINVAL ? 0 : 1;
	}
	char self[4096];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n > 0) {
		self[n] = '\0';
		setenv("KV_TEST_SELF", self, 1);
	}
	return cmocka_run_group_tests(tests, NULL, NULL);
}
