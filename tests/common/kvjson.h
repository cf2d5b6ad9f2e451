/* SPDX-License-Identifier: MIT */
/*
 * json-c helpers for the tests that read a program's JSON output: a member
 * of a given type, or a number, failing the test with what was found.
 */
#ifndef KV_TEST_JSON_H
#define KV_TEST_JSON_H

#include <json-c/json.h>

#include "kvtest.h"

static inline struct json_object *get(struct json_object *obj, const char *key,
				      enum json_type type)
{
	struct json_object *v = NULL;

	if (!json_object_object_get_ex(obj, key, &v))
		fail_msg("key \"%s\" missing in %s", key, json_object_to_json_string(obj));
	if (!json_object_is_type(v, type))
		fail_msg("key \"%s\" has type %s, want %s", key,
			 json_type_to_name(json_object_get_type(v)), json_type_to_name(type));
	return v;
}

/* A number: json-c reads an integral one ("70905") as an int. */
static inline double get_number(struct json_object *obj, const char *key)
{
	struct json_object *v = NULL;

	if (!json_object_object_get_ex(obj, key, &v))
		fail_msg("key \"%s\" missing in %s", key, json_object_to_json_string(obj));
	if (!json_object_is_type(v, json_type_double) && !json_object_is_type(v, json_type_int))
		fail_msg("key \"%s\" is not a number", key);
	return json_object_get_double(v);
}

#endif /* KV_TEST_JSON_H */
