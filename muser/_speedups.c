/* muser._speedups: the hot path's plain loop (muser/session/fast.py, `serve_plain`)
 * in C, an optional accelerator. It serves whole REGION_READ and REGION_WRITE
 * messages from a receive, calling the device's region readers and writers, and
 * stops where the Python loop stops; fast.py handles the rest alike for both, and
 * the differential tests hold the two to the same replies. If this file does not
 * build, muser runs the Python loop.
 *
 * serve_plain(data, (sizes, max_count, readers, writers, send, sink, context, observe))
 *   -> (position, answered, pending), for a lane whose observe is None
 * pending is None, or (start, kind, value) for the message at `start` whose
 * handler returned something other than the plain answer (kind 0: a read's result,
 * 1: a write's result) or raised (kind 2: the exception).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define HEADER_SIZE 16
#define ACCESS_SIZE 32
#define REGION_READ 9
#define REGION_WRITE 10
#define FLAGS_COMMAND 0x0
#define FLAGS_POSTED 0x10
#define FLAGS_REPLY 0x1
#define PENDING_READ 0
#define PENDING_WRITE 1
#define PENDING_RAISED 2

static PyObject *str_backlogged, *str_stopping;

static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }
static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (v >> (8 * i)) & 0xff;
}

/* Whether an attribute is truthy; -1 on error. */
static int flag(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* The reply header: the request's head with the reply's size and flags. */
static void reply_header(unsigned char *out, const unsigned char *request, uint32_t size)
{
    memcpy(out, request, ACCESS_SIZE);
    put32(out + 4, size);
    put32(out + 8, FLAGS_REPLY);
    put32(out + 12, 0);
}

static int send_reply(PyObject *send, PyObject *reply)
{
    PyObject *buffers = PyTuple_Pack(1, reply);
    Py_DECREF(reply);
    if (buffers == NULL) return -1;
    PyObject *done = PyObject_CallOneArg(send, buffers);
    Py_DECREF(buffers);
    if (done == NULL) return -1;
    Py_DECREF(done);
    return 0;
}

/* Call fn(offset, second); second is stolen. */
static PyObject *call2(PyObject *fn, uint64_t offset, PyObject *second)
{
    if (second == NULL) return NULL;
    PyObject *first = PyLong_FromUnsignedLongLong(offset);
    if (first == NULL) {
        Py_DECREF(second);
        return NULL;
    }
    PyObject *args[2] = {first, second};
    PyObject *result = PyObject_Vectorcall(fn, args, 2, NULL);
    Py_DECREF(first);
    Py_DECREF(second);
    return result;
}

static PyObject *finish(Py_ssize_t position, int answered)
{
    return Py_BuildValue("(nOO)", position, answered ? Py_True : Py_False, Py_None);
}

/* A message served that the Python side must answer: `value` (stolen) is what
 * its handler returned, or raised. */
static PyObject *hand_back(Py_ssize_t position, int answered, Py_ssize_t start, int kind,
                           PyObject *value)
{
    return Py_BuildValue("(nO(niN))", position, answered ? Py_True : Py_False, start, kind, value);
}

/* The handler raised: an Exception is handed back, anything else (KeyboardInterrupt,
 * a cancellation) propagates, as in the Python loop. */
static PyObject *raised(Py_ssize_t start, Py_ssize_t position, int answered)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *value = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
#endif
    return hand_back(position, answered, start, PENDING_RAISED, value);
}

static PyObject *serve_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyTuple_CheckExact(args[1]) || PyTuple_GET_SIZE(args[1]) != 8
        || PyTuple_GET_ITEM(args[1], 7) != Py_None) {
        PyErr_SetString(PyExc_TypeError, "serve_plain(data, lane): a lane of 8, observing nothing");
        return NULL;
    }
    PyObject *data = args[0], *lane = args[1];
    PyObject *sizes = PyTuple_GET_ITEM(lane, 0), *readers = PyTuple_GET_ITEM(lane, 2);
    PyObject *writers = PyTuple_GET_ITEM(lane, 3), *send = PyTuple_GET_ITEM(lane, 4);
    PyObject *sink = PyTuple_GET_ITEM(lane, 5), *context = PyTuple_GET_ITEM(lane, 6);
    if (!PyBytes_CheckExact(data) || !PyTuple_CheckExact(sizes) || !PyTuple_CheckExact(readers)
        || !PyTuple_CheckExact(writers)) {
        PyErr_SetString(PyExc_TypeError, "serve_plain: bytes and tuples expected");
        return NULL;
    }
    unsigned long long max_count = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(lane, 1));
    if (max_count == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    const unsigned char *bytes = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t end = PyBytes_GET_SIZE(data), position = 0;
    Py_ssize_t regions = PyTuple_GET_SIZE(sizes);
    int answered = 0;
    while (end - position >= ACCESS_SIZE) {
        const unsigned char *m = bytes + position;
        uint16_t command = le16(m + 2);
        uint32_t size = le32(m + 4), flags = le32(m + 8), region = le32(m + 24);
        uint32_t count = le32(m + 28);
        uint64_t offset = le64(m + 16);
        if ((command != REGION_READ && command != REGION_WRITE)
            || (flags != FLAGS_COMMAND && flags != FLAGS_POSTED) || size > (uint64_t)(end - position)
            || region >= (uint64_t)regions || count == 0 || count > max_count
            || region >= (uint64_t)PyTuple_GET_SIZE(readers)
            || region >= (uint64_t)PyTuple_GET_SIZE(writers))
            break;
        unsigned long long region_size = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(sizes, region));
        if (region_size == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
        if (count > region_size || offset > region_size - count) break;
        int backlogged = flag(sink, str_backlogged);
        if (backlogged) {
            if (backlogged < 0) return NULL;
            break;
        }
        int stopping = flag(context, str_stopping);
        if (stopping) {
            if (stopping < 0) return NULL;
            break;
        }
        int posted = flags == FLAGS_POSTED;
        if (command == REGION_READ && size == ACCESS_SIZE) {
            Py_ssize_t start = position;
            position += size;
            PyObject *fn = PyTuple_GET_ITEM(readers, region);
            PyObject *result = call2(fn, offset, PyLong_FromUnsignedLong(count));
            if (result == NULL) return raised(start, position, answered);
            if (!PyBytes_CheckExact(result) || PyBytes_GET_SIZE(result) != (Py_ssize_t)count)
                return hand_back(position, answered, start, PENDING_READ, result);
            if (!posted) {
                PyObject *reply = PyBytes_FromStringAndSize(NULL, ACCESS_SIZE + count);
                if (reply == NULL) {
                    Py_DECREF(result);
                    return NULL;
                }
                unsigned char *out = (unsigned char *)PyBytes_AS_STRING(reply);
                reply_header(out, m, ACCESS_SIZE + count);
                memcpy(out + ACCESS_SIZE, PyBytes_AS_STRING(result), count);
                answered = 1;
                if (send_reply(send, reply) < 0) {
                    Py_DECREF(result);
                    return NULL;
                }
            }
            Py_DECREF(result);
        } else if (command == REGION_WRITE && size == (uint64_t)ACCESS_SIZE + count) {
            Py_ssize_t start = position;
            position += size;
            PyObject *fn = PyTuple_GET_ITEM(writers, region);
            PyObject *payload = PyBytes_FromStringAndSize((const char *)m + ACCESS_SIZE, count);
            PyObject *done = call2(fn, offset, payload);
            if (done == NULL) return raised(start, position, answered);
            if (done != Py_None) return hand_back(position, answered, start, PENDING_WRITE, done);
            Py_DECREF(done);
            if (!posted) {
                PyObject *reply = PyBytes_FromStringAndSize(NULL, ACCESS_SIZE);
                if (reply == NULL) return NULL;
                reply_header((unsigned char *)PyBytes_AS_STRING(reply), m, ACCESS_SIZE);
                answered = 1;
                if (send_reply(send, reply) < 0) return NULL;
            }
        } else {
            break; /* a size that does not fit the command: the general path refuses it */
        }
    }
    return finish(position, answered);
}

static PyMethodDef methods[] = {
    {"serve_plain", (PyCFunction)(void (*)(void))serve_plain, METH_FASTCALL,
     "Serve the plain REGION_READ/REGION_WRITE messages at the start of a receive."},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    str_backlogged = PyUnicode_InternFromString("backlogged");
    str_stopping = PyUnicode_InternFromString("stopping");
    if (str_backlogged == NULL || str_stopping == NULL) return -1;
    if (PyModule_AddIntConstant(module, "ACCESS_SIZE", ACCESS_SIZE) < 0) return -1;
    if (PyModule_AddIntConstant(module, "FLAGS_POSTED", FLAGS_POSTED) < 0) return -1;
    if (PyModule_AddIntConstant(module, "FLAGS_REPLY", FLAGS_REPLY) < 0) return -1;
    if (PyModule_AddIntConstant(module, "REGION_READ", REGION_READ) < 0) return -1;
    if (PyModule_AddIntConstant(module, "REGION_WRITE", REGION_WRITE) < 0) return -1;
    if (PyModule_AddIntConstant(module, "HEADER_SIZE", HEADER_SIZE) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "muser._speedups",
    .m_doc = "The hot path's plain loop in C (optional; see muser/session/fast.py).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModuleDef_Init(&module_def); }
