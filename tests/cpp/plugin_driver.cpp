// Drives libtrtglm_plugins.so the way TensorRT's plugin registry and builder do, without TensorRT or a GPU:
// dlopen, setLoggerFinder, getCreators; per creator: names, field names, createPlugin from ONNX-style attributes,
// the build capability (outputs, types, shapes, formats), serialization through getFieldsToSerialize and
// re-creation at the runtime phase, clone, and rejection of bad attributes (null plugin, one logged error).
// enqueue needs a GPU: tests/gpu covers the kernels. Prints one line per check; exits 1 on the first failure.
//
// g++ -std=c++17 -isystem <TensorRT include> -isystem <CUDA include> plugin_driver.cpp -ldl -o driver
// ./driver path/to/libtrtglm_plugins.so
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
int gErrors = 0;

class Logger : public ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kERROR)
        {
            ++gErrors;
            std::printf("  logged: %s\n", msg);
        }
    }
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override { return &mLogger; }

private:
    Logger mLogger;
};

// Never called: the plugins' getOutputShapes copy the input expressions and build none.
class UnusedExprBuilder : public IExprBuilder
{
};

void check(bool ok, std::string const& what)
{
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    if (!ok)
    {
        std::exit(1);
    }
}

struct Attrs
{
    std::vector<std::string> names;
    std::vector<int32_t> ints;
    std::vector<float> floats;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};

    // ONNX attributes reach a plugin as INT32 and FLOAT32 fields (TensorRT's ONNX parser)
    Attrs(std::vector<std::pair<char const*, int32_t>> const& i, std::vector<std::pair<char const*, float>> const& f)
    {
        ints.reserve(i.size());
        floats.reserve(f.size());
        for (auto const& [name, v] : i)
        {
            ints.push_back(v);
            fields.emplace_back(name, &ints.back(), PluginFieldType::kINT32, 1);
        }
        for (auto const& [name, v] : f)
        {
            floats.push_back(v);
            fields.emplace_back(name, &floats.back(), PluginFieldType::kFLOAT32, 1);
        }
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
    }
};

DynamicPluginTensorDesc desc(DataType type, std::vector<int64_t> const& dims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
    }
    d.min = d.max = d.opt = d.desc.dims;
    return d;
}

std::string fieldsText(PluginFieldCollection const* fc)
{
    std::string text;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        text += f.name;
        text += "=";
        text += f.type == PluginFieldType::kINT32 ? std::to_string(*static_cast<int32_t const*>(f.data))
                                                   : std::to_string(*static_cast<float const*>(f.data));
        text += ";";
    }
    return text;
}

// createPlugin, the build checks, serialize -> re-create -> same fields, clone.
IPluginV3* roundTrip(IPluginCreatorV3One* creator, Attrs& attrs, std::string const& name)
{
    IPluginV3* plugin = creator->createPlugin(name.c_str(), &attrs.fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, name + ": createPlugin");
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(std::strcmp(core->getPluginName(), creator->getPluginName()) == 0
            && std::strcmp(core->getPluginNamespace(), "trtglm") == 0 && std::strcmp(core->getPluginVersion(), "1") == 0,
        name + ": core names match the creator's");
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::string serialized = fieldsText(runtime->getFieldsToSerialize());
    IPluginV3* again = creator->createPlugin(name.c_str(), runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME);
    check(again != nullptr, name + ": re-created from its serialized fields (" + serialized + ")");
    auto* runtime2 = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(fieldsText(runtime2->getFieldsToSerialize()) == serialized, name + ": same fields after the round trip");
    IPluginV3* copy = plugin->clone();
    auto* runtime3 = static_cast<IPluginV3OneRuntime*>(copy->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(fieldsText(runtime3->getFieldsToSerialize()) == serialized, name + ": clone keeps the fields");
    delete again;
    delete copy;
    return plugin;
}

IPluginV3OneBuild* build(IPluginV3* plugin)
{
    return static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libtrtglm_plugins.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    check(lib != nullptr, std::string("dlopen (") + (lib ? "" : dlerror()) + ")");
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    check(getCreators != nullptr && setLoggerFinder != nullptr, "getCreators and setLoggerFinder exported");
    static Finder finder;
    setLoggerFinder(&finder);
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    check(n == 3, "three creators");
    IPluginCreatorV3One* byName[3] = {};
    char const* names[3] = {"TrtglmResidualNorm", "TrtglmRotary", "TrtglmAttention"};
    for (int32_t i = 0; i < n; ++i)
    {
        check(std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "a V3One creator");
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        for (int32_t k = 0; k < 3; ++k)
        {
            if (std::strcmp(c->getPluginName(), names[k]) == 0)
            {
                byName[k] = c;
            }
        }
    }
    check(byName[0] && byName[1] && byName[2], "TrtglmResidualNorm, TrtglmRotary and TrtglmAttention");

    // ---- TrtglmResidualNorm: residual add + LayerNorm with beta, INT8 output -------------------------------------
    {
        Attrs attrs({{"kind", 1}, {"has_residual", 1}, {"has_beta", 1}}, {{"eps", 1e-6f}, {"out_scale", 0.05f}});
        IPluginV3* plugin = roundTrip(byName[0], attrs, "TrtglmResidualNorm");
        IPluginV3OneBuild* b = build(plugin);
        check(b->getNbOutputs() == 2, "ResidualNorm: output and residual_out");
        DataType in[4] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF};
        DataType out[2];
        check(b->getOutputDataTypes(out, 2, in, 4) == 0 && out[0] == DataType::kINT8 && out[1] == DataType::kHALF,
            "ResidualNorm: int8 output (out_scale), half residual_out");
        DimsExprs dims[4] = {};
        dims[0].nbDims = 3;
        DimsExprs outs[2] = {};
        UnusedExprBuilder exprs;
        check(b->getOutputShapes(dims, 4, nullptr, 0, outs, 2, exprs) == 0
                && outs[0].nbDims == 3 && outs[1].nbDims == 3,
            "ResidualNorm: outputs shaped like the input");
        DynamicPluginTensorDesc io[6] = {desc(DataType::kHALF, {2, 7, 64}), desc(DataType::kHALF, {2, 7, 64}),
            desc(DataType::kHALF, {64}), desc(DataType::kHALF, {64}), desc(DataType::kINT8, {2, 7, 64}),
            desc(DataType::kHALF, {2, 7, 64})};
        bool all = true;
        for (int32_t pos = 0; pos < 6; ++pos)
        {
            all = all && b->supportsFormatCombination(pos, io, 4, 2);
        }
        check(all, "ResidualNorm: half inputs, int8 output, half residual_out accepted");
        io[4].desc.type = DataType::kHALF;
        check(!b->supportsFormatCombination(4, io, 4, 2), "ResidualNorm: a float output 0 refused with out_scale");
        io[1].desc.type = DataType::kFLOAT;
        check(!b->supportsFormatCombination(1, io, 4, 2), "ResidualNorm: mixed input types refused");
        io[0].desc.format = TensorFormat::kHWC8;
        check(!b->supportsFormatCombination(0, io, 4, 2), "ResidualNorm: only LINEAR");
        delete plugin;
    }
    {
        int32_t before = gErrors;
        Attrs bad({{"kind", 0}, {"has_beta", 1}}, {});
        check(byName[0]->createPlugin("bad", &bad.fc, TensorRTPhase::kBUILD) == nullptr && gErrors == before + 1,
            "ResidualNorm: beta with RMSNorm refused, one error logged");
    }

    // ---- TrtglmRotary ------------------------------------------------------------------------------------------
    {
        Attrs attrs({{"rotary_dim", 64}, {"interleaved", 1}}, {});
        IPluginV3* plugin = roundTrip(byName[1], attrs, "TrtglmRotary");
        IPluginV3OneBuild* b = build(plugin);
        DataType in[4] = {DataType::kBF16, DataType::kBF16, DataType::kFLOAT, DataType::kFLOAT};
        DataType out[2];
        check(b->getNbOutputs() == 2 && b->getOutputDataTypes(out, 2, in, 4) == 0 && out[0] == DataType::kBF16
                && out[1] == DataType::kBF16,
            "Rotary: q_out, k_out in q's type");
        DynamicPluginTensorDesc io[6] = {desc(DataType::kBF16, {2, 32, 9, 128}), desc(DataType::kBF16, {2, 2, 9, 128}),
            desc(DataType::kFLOAT, {2, 9, 32}), desc(DataType::kFLOAT, {2, 9, 32}),
            desc(DataType::kBF16, {2, 32, 9, 128}), desc(DataType::kBF16, {2, 2, 9, 128})};
        bool all = true;
        for (int32_t pos = 0; pos < 6; ++pos)
        {
            all = all && b->supportsFormatCombination(pos, io, 4, 2);
        }
        check(all, "Rotary: bf16 q/k, fp32 cos/sin accepted");
        io[2].desc.type = DataType::kBF16;
        check(!b->supportsFormatCombination(2, io, 4, 2), "Rotary: cos must be fp32");
        delete plugin;
        Attrs odd({{"rotary_dim", 63}}, {});
        check(byName[1]->createPlugin("odd", &odd.fc, TensorRTPhase::kBUILD) == nullptr, "Rotary: odd rotary_dim refused");
    }

    // ---- TrtglmAttention ---------------------------------------------------------------------------------------
    {
        Attrs attrs({{"causal", 1}}, {{"scale", 0.125f}});
        IPluginV3* plugin = roundTrip(byName[2], attrs, "TrtglmAttention");
        IPluginV3OneBuild* b = build(plugin);
        DynamicPluginTensorDesc io[4] = {desc(DataType::kHALF, {4, 32, 1, 128}), desc(DataType::kHALF, {4, 2, 4096, 128}),
            desc(DataType::kHALF, {4, 2, 4096, 128}), desc(DataType::kHALF, {4, 32, 1, 128})};
        bool all = true;
        for (int32_t pos = 0; pos < 4; ++pos)
        {
            all = all && b->supportsFormatCombination(pos, io, 3, 1);
        }
        check(all, "Attention: fp16 q/k/v/out accepted");
        io[0].desc.type = DataType::kFLOAT;
        check(!b->supportsFormatCombination(0, io, 3, 1), "Attention: fp32 refused (the kernels are fp16/bf16)");
        io[0].desc.type = DataType::kHALF;
        size_t workspace = b->getWorkspaceSize(io, 3, io + 3, 1);
        check(workspace > 0, "Attention: a decode workspace for the split-KV partials (" + std::to_string(workspace)
                + " bytes)");
        delete plugin;
    }
    std::printf("all checks passed\n");
    return 0;
}
