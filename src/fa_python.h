// The CPython accessors the plan's per-step code uses.  The stable ABI (the
// abi3 build: setup.py, docs/building.md) has no macros that read an object's
// fields; there these are the functions of the same meaning, which check their
// argument again (the callers have checked its type and size already).
#pragma once
#include <Python.h>

#ifdef Py_LIMITED_API
#define fa_list_size PyList_Size
#define fa_list_item PyList_GetItem
#define fa_tuple_size PyTuple_Size
#define fa_tuple_item PyTuple_GetItem
#define fa_float_value PyFloat_AsDouble
#else
#define fa_list_size PyList_GET_SIZE
#define fa_list_item PyList_GET_ITEM
#define fa_tuple_size PyTuple_GET_SIZE
#define fa_tuple_item PyTuple_GET_ITEM
#define fa_float_value PyFloat_AS_DOUBLE
#endif
